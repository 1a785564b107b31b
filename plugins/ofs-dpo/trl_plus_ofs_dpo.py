"""OFS-DPO / COFS-DPO — Online DPO with Fast-Slow Chasing (arXiv 2406.05534; official code: not found).

Two LoRA adapters on one frozen base, trained on the same preference stream: a *fast* one (a higher learning rate,
``model.adapters.fast.lr_scale``) and a *slow* one. Per adapter m ∈ {fast, slow}, with the base (every adapter
off) as the reference and sequence log-prob sums ℓ:

    Δ_m = [ℓ_m(y_w) − ℓ_ref(y_w)] − [ℓ_m(y_l) − ℓ_ref(y_l)],      L_m = −log σ(β Δ_m)

and the chasing regulariser (a reconstruction: only the abstract and summaries of the paper were readable)

    R = −log σ(β [(ℓ_f(y_w) − sg ℓ_s(y_w)) − (ℓ_f(y_l) − sg ℓ_s(y_l))])     (``regulariser: chase``, default)
    R' = (log σ(β Δ_f) − log σ(β Δ_s))²                                   (``regulariser: gap``)

    L = mean over pairs of  L_f + L_s + λ · R

R is DPO of the fast adapter against the current slow one as its moving reference (stop-gradient: R gives the slow
adapter no gradient). λ = 0 makes the two adapters two independent DPO runs. COFS (continual, several domains)
combines the fast adapters of past domains: :func:`cofs` (a weighted Σ w·ΔW, or the literal per-tensor average).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trl_plus import LossContext, LossOutput, Method, MethodConfig, Needs, Paper, TrlPlusError, combine, hookimpl

#: The two adapters (recipe ``model.adapters.fast`` / ``model.adapters.slow``).
FAST, SLOW = "fast", "slow"


class OFSDPOConfig(MethodConfig):
    """OFS-DPO hyperparameters. The paper's values were not found: β is DPO's usual 0.1, λ the card's worked
    example (its typical range 0.1–1); the learning-rate ratio is the recipe's ``lr_scale`` of each adapter."""

    beta: float = Field(0.1, gt=0, description="β, DPO temperature of both adapters and of R (paper: not found; 0.1)")
    lam: float = Field(1.0, ge=0, description="λ, weight of the chasing regulariser (paper: not found; "
                                              "reconstruction, typical 0.1–1); 0 = two independent DPO adapters")
    regulariser: Literal["chase", "gap"] = Field(
        "chase", description="chase: DPO of the fast adapter with the slow one (stop-grad) as reference; gap: the "
        "squared gap of the two adapters' log preference probabilities (both reconstructions)")  # fmt: skip


def ofs_terms(ctx: LossContext, beta: float, regulariser: str = "chase"):
    """``([B] L_f, [B] L_s, [B] R, [2, B] fast log-ratios, [2, B] slow log-ratios)`` of one batch, read from
    ``ctx.for_adapter("fast")`` and ``ctx.for_adapter("slow")``."""
    import torch.nn.functional as F

    fast, slow = ctx.for_adapter(FAST), ctx.for_adapter(SLOW)
    ref = fast.ref_logps()
    fast_logps, slow_logps = fast.logps(), slow.logps()
    fast_ratios, slow_ratios = fast_logps - ref, slow_logps - ref
    delta_fast = fast_ratios[0] - fast_ratios[1]
    delta_slow = slow_ratios[0] - slow_ratios[1]
    loss_fast, loss_slow = -F.logsigmoid(beta * delta_fast), -F.logsigmoid(beta * delta_slow)
    if regulariser == "chase":
        chase = fast_logps - slow_logps.detach()  # the slow adapter as the fast one's moving reference
        reg = -F.logsigmoid(beta * (chase[0] - chase[1]))
    else:
        reg = (F.logsigmoid(beta * delta_fast) - F.logsigmoid(beta * delta_slow)) ** 2
    return loss_fast, loss_slow, reg, fast_ratios, slow_ratios


class OFSDPO(Method):
    name = "ofs-dpo"
    taxonomy = {"data.quality": ("heterogeneity", "distinguishability"), "data.feedback": "pair", "data.granularity": "sentence",
                "learning.paradigm": "online", "constraint.reference": "dynamic-reference",
                "property": "alignment-tax", "scope": "text",
                "survey": ("heterogeneity", "distinguishability", "online"), "source": "survey"}
    family = "offline-pairwise"
    paper = Paper("Online DPO: Online Direct Preference Optimization with Fast-Slow Chasing", "2406.05534")
    summary = "DPO on a fast and a slow LoRA adapter (own learning rates) coupled by a chasing regulariser (reconstructed)"
    needs = Needs(reference="yes", policy_adapters=(FAST, SLOW))
    Config = OFSDPOConfig

    def loss(self, ctx: LossContext) -> LossOutput:
        """``mean(L_f + L_s + λ R)``; rewards ``β ·`` the fast adapter's log-ratios (the slow one's are logged as
        ``ofs/slow_margin``)."""
        c = self.config
        if ctx.num_sequences != 2:
            raise TrlPlusError(f"ofs-dpo scores pairs (chosen, rejected); got {ctx.num_sequences} sequences")
        loss_fast, loss_slow, reg, fast_ratios, slow_ratios = ofs_terms(ctx, c.beta, c.regulariser)
        loss = (loss_fast + loss_slow + c.lam * reg).mean()
        slow_margin = c.beta * (slow_ratios[0] - slow_ratios[1]).detach()
        return LossOutput(loss, rewards=c.beta * fast_ratios.detach(), metrics={
            "ofs/loss_fast": loss_fast.mean().detach(), "ofs/loss_slow": loss_slow.mean().detach(),
            "ofs/regulariser": reg.mean().detach(), "ofs/slow_margin": slow_margin.mean(),
        })  # fmt: skip

    def generation_model(self, model, weights):
        """``trl-plus generate``: the fast adapter, or with ``--weights w_fast,w_slow`` their combination
        Σ w·ΔW (:func:`cofs`, ``cat``)."""
        if weights is None:
            model.set_adapter(FAST)
            return model
        if len(weights) != 2:
            raise TrlPlusError(f"--weights: ofs-dpo combines the fast and the slow adapter: give 2 weights, got "
                               f"{len(weights)}")  # fmt: skip
        cofs(model, [FAST, SLOW], weights, target="combined")
        model.set_adapter("combined")
        return model


def cofs(model, adapters: list[str], weights: list[float], target: str = "cofs", how: str = "cat") -> None:
    """COFS-DPO's combination of per-domain (fast) adapters into adapter ``target`` of the PEFT ``model``:
    ``how="cat"`` gives ΔW = Σ w_d ΔW_d exactly; ``"mean"`` averages the A and B matrices per tensor (the card's
    literal "linear combination of parameters"; not Σ w·ΔW). Weights on the simplex (Σ w = 1), as the card says;
    how the paper chooses them: not found (a grid / simplex search on held-out data of all domains)."""
    if any(w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise TrlPlusError(f"cofs: the weights are a point of the simplex (non-negative, sum 1), got {weights}")
    combine(model, adapters, weights, target, how=how)


@hookimpl
def register_methods(register):
    register(OFSDPO)
