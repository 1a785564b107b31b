"""IS-DAA — Mitigating Reward Over-optimization in Direct Alignment Algorithms with Importance Sampling
(NeurIPS 2025; official code mail-research/AIS-Sampling4DAAs, ``cli/train_is_dpo.py``).

Each pair's direct-alignment loss is multiplied by a clipped, stop-gradient, sequence-level importance ratio of the
current policy to the data-generating (behaviour) policy over *both* responses of the pair:

    log w_i = min( [ℓθ(y_w) − ℓdata(y_w)] + [ℓθ(y_l) − ℓdata(y_l)], 2ε ),    w_i = sg(exp(log w_i))
    L = mean_i  w_i · L_DAA(Δ_i),      Δ_i = (ℓθ(y_w) − ℓref(y_w)) − (ℓθ(y_l) − ℓref(y_l))

ℓ are token-sum log-probs over the completion; ℓdata are the optional columns ``chosen_logps`` /
``rejected_logps`` when the data has them, else the reference log-probs. L_DAA is DPO ``−log σ(βΔ)`` or IPO
``(Δ − 1/(2β))²`` (the released script's active line; not length-normalised). There is no lower clip and no
normalisation of w.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trl_plus import DPO, DPOConfig, LossContext, LossOutput, Needs, Paper, hookimpl

BEHAVIOUR_COLUMNS = ("chosen_logps", "rejected_logps")


class ISDAAConfig(DPOConfig):
    """IS-DAA hyperparameters: the base loss's (DPO's, sigmoid or IPO) plus the clip ε (official config.py)."""

    beta: float = Field(0.1, gt=0, description="β, DAA temperature (config.py: 0.1; released script: 0.05)")
    eps: float = Field(
        0.25, ge=0, description="ε: the log-weight is capped at 2ε, w ≤ e^{2ε} (config.py: 0.25; released script: 1.0)"
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="base DAA loss: sigmoid = DPO; ipo = IPO (the released script's active line)"
    )
    ipo_normalize_by_length: bool = Field(
        False, description="IPO only: divide each log-ratio by its length (TRL) or not (official code, default)"
    )


def behaviour_logps(ctx: LossContext):
    """``[2, B]`` behaviour-policy sequence log-probs: the batch's ``chosen_logps``/``rejected_logps`` when the data
    has them, else the reference log-probs."""
    import torch

    present = [name for name in BEHAVIOUR_COLUMNS if name in ctx.batch]
    if not present:
        return ctx.ref_logps()
    if len(present) == 1:
        raise ValueError(f"is-daa: the data has {present[0]!r} but not its pair; give both chosen_logps and "
                         "rejected_logps (token-sum behaviour log-probs) or neither")  # fmt: skip
    logps = ctx.token_logps
    return torch.stack([torch.as_tensor(ctx.batch[name]).to(logps.device, logps.dtype) for name in BEHAVIOUR_COLUMNS])


def importance_weights(ctx: LossContext, eps: float):
    """``[B]`` stop-gradient weights ``exp(min(Σ_{y∈{y_w,y_l}} ℓθ(y) − ℓdata(y), 2ε))`` and the un-clipped
    log-weights."""
    import torch

    with torch.no_grad():
        log_weight = (ctx.logps().detach() - behaviour_logps(ctx)).sum(0)
        return log_weight.clamp(max=2 * eps).exp(), log_weight


class ISDAA(DPO):
    """DPO or IPO with each pair's loss weighted by a clipped, stop-gradient sequence-level importance ratio."""

    name = "is-daa"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "constraint.divergence": "generalization", "property": "distribution-shift", "scope": "text",
                "source": "inferred"}
    paper = Paper(
        "Mitigating Reward Over-optimization in Direct Alignment Algorithms with Importance Sampling",
        "2506.08681",
        code="mail-research/AIS-Sampling4DAAs",
    )
    summary = "DPO/IPO weighted per pair by a clipped, stop-gradient importance ratio πθ/π_data (both responses)"
    needs = Needs(reference="yes", optional_fields=BEHAVIOUR_COLUMNS)
    Config = ISDAAConfig

    def loss(self, ctx: LossContext) -> LossOutput:
        """``mean(w · L_DAA)``; logs the mean weight, the clipped fraction and the unweighted base loss."""
        losses, ratios = self.pair_losses(ctx)
        weights, log_weight = importance_weights(ctx, self.config.eps)
        return LossOutput(
            loss=(weights * losses).mean(),
            rewards=self.config.beta * ratios.detach(),
            metrics={
                "is_daa/weight": weights.mean(),
                "is_daa/clipped": (log_weight > 2 * self.config.eps).float().mean(),
                "is_daa/base_loss": losses.detach().mean(),
            },
        )


@hookimpl
def register_methods(register):
    """Register ``is-daa``."""
    register(ISDAA)
