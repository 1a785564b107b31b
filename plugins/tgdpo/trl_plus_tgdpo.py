"""TGDPO — Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization (ICML 2025,
arXiv 2506.14574; official code dvlab-research/TGDPO, ``src/llamafactory/train/tgdpo/trainer.py``).

DPO whose per-token KL strength is modulated by a frozen token-level reward model, the *guidance model* π_g (in
practice a DPO-trained model on the same data). Per response token t, with the policy's own reference π_ref:

    ρ_t  = log πθ(y_t|s_t) − log πref(y_t|s_t)                     (with grad)
    r̂_t  = β · (log π_g(y_t|s_t) − log πref(y_t|s_t))              (stop-gradient: β twice, as the code)
    ω^w_t = β (1 + α r̂^w_t)      on chosen tokens,      ω^l_t = β (1 − α r̂^l_t)      on rejected tokens
    L = −log σ( Σ_{t∈y_w} ω^w_t ρ^w_t − Σ_{t∈y_l} ω^l_t ρ^l_t ),   mean over pairs

The weights sit *inside* the sums over response tokens. α = 0, or π_g = π_ref, is DPO exactly. The guidance
model is the frozen source ``guide`` (``Needs.teachers = {"guide": "logps"}``): a separate model, a frozen LoRA
adapter on the policy's own base, or precomputed columns (recipe block ``teachers.guide``).
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import DPO, DPOConfig, LossContext, LossOutput, Needs, Paper, TrlPlusError, hookimpl

#: The name of the guidance model's frozen source (recipe block ``teachers.guide``).
GUIDE = "guide"


class TGDPOConfig(DPOConfig):
    """TGDPO hyperparameters: DPO's (β, the base loss) plus the guidance strength α and an optional weight floor."""

    beta: float = Field(0.1, gt=0, description="β (pref_beta): DPO temperature, also scales the token reward r̂ "
                                               "(official recipe: 0.1)")  # fmt: skip
    alpha: float = Field(0.5, ge=0, description="α (tgdpo_alpha): strength of the token reward guidance; 0 = DPO "
                                                "(official code default and recipe: 0.5)")  # fmt: skip
    min_weight: float | None = Field(
        None, description="floor on the per-token factor 1 ± α·r̂ (keeps every weight positive); None = no clamp, "
        "as the official code (the card's open question; not in the paper)")  # fmt: skip


def token_weights(ctx: LossContext, alpha: float, beta: float, min_weight: float | None = None, source: str = GUIDE):
    """``([K, B, T] factors 1 ± α·r̂_t, [K, B, T] token rewards r̂_t)``, both without gradient and zero off the
    scored tokens: ``+`` on the chosen sequence (k = 0), ``−`` on the rejected one (k = 1). The loss's weight is
    ``β`` times the factor."""
    import torch

    if ctx.ref_token_logps is None:
        raise TrlPlusError("tgdpo needs reference log-probs: set reference.mode to auto, model, adapter or precomputed")
    frozen = ctx.frozen.get(source)
    if frozen is None or frozen.logps is None:
        raise TrlPlusError(f"tgdpo needs the guidance model's log-probs: add a teachers.{source} block to the recipe "
                           f"(name_or_path or adapter of a DPO-trained model) or pass teachers={{'{source}': ...}}")
    if ctx.num_sequences != 2:
        raise TrlPlusError(f"tgdpo scores pairs (chosen, rejected); got {ctx.num_sequences} sequences per example")
    guide = frozen.logps
    if guide.shape != ctx.token_logps.shape:
        raise TrlPlusError(f"teachers.{source}: log-probs shaped {tuple(guide.shape)}, the policy's "
                           f"{tuple(ctx.token_logps.shape)}: the guidance model must share the policy's tokenizer")
    with torch.no_grad():
        mask = ctx.mask.to(ctx.token_logps.dtype)
        guide = guide.detach().to(ctx.token_logps.device, ctx.token_logps.dtype)
        reward = beta * (guide - ctx.ref_token_logps.detach().to(guide.dtype)) * mask
        sign = torch.tensor([1.0, -1.0], dtype=reward.dtype, device=reward.device).view(2, 1, 1)
        factors = 1 + alpha * sign * reward
        if min_weight is not None:
            factors = factors.clamp(min=min_weight)
        return factors * mask, reward


class TGDPO(DPO):
    """DPO with per-token weights β(1 ± α·r̂_t) from a frozen guidance model inside the sums over response tokens."""

    name = "tgdpo"
    taxonomy = {"data.feedback": "pair", "data.granularity": "token", "learning.paradigm": "offline",
                "constraint.reference": "fixed", "property": (), "scope": "text", "survey": ("token",),
                "source": "survey"}
    family = "token-level"
    paper = Paper(
        "TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization",
        "2506.14574",
        code="dvlab-research/TGDPO",
    )
    summary = "DPO with per-token β weights 1 ± α·β(log π_g − log π_ref) from a frozen guidance (DPO) model"
    needs = Needs(reference="yes", teachers={GUIDE: "logps"})
    Config = TGDPOConfig

    def token_weights(self, ctx: LossContext):
        """``([K, B, T] factors 1 ± α r̂, [K, B, T] r̂)`` of this method's config (see :func:`token_weights`)."""
        c = self.config
        return token_weights(ctx, c.alpha, c.beta, c.min_weight)

    def log_ratios(self, ctx: LossContext):
        """``[K, B]`` Σ_t (1 ± α r̂_t) ρ_t: DPO's base loss applied to these gives ``−log σ(Σ ω^w ρ^w − Σ ω^l ρ^l)``
        (the β of ω factored out, as DPO multiplies the margin by β)."""
        factors, _ = self.token_weights(ctx)
        rho = (ctx.token_logps - ctx.ref_token_logps) * ctx.mask
        return (factors * rho).sum(-1)

    def loss(self, ctx: LossContext) -> LossOutput:
        """The batch mean of the token-weighted pair losses; rewards are DPO's β·Σρ (as the code logs them)."""
        losses, _ = self.pair_losses(ctx)
        factors, reward = self.token_weights(ctx)
        mask = ctx.mask.bool()
        plain = (ctx.logps() - ctx.ref_logps()).detach()
        metrics = {
            "tgdpo/weight_chosen": factors[0][mask[0]].mean() * self.config.beta,
            "tgdpo/weight_rejected": factors[1][mask[1]].mean() * self.config.beta,
            "tgdpo/min_factor": factors[mask].min(),
            "tgdpo/token_reward_chosen": reward[0][mask[0]].mean(),
            "tgdpo/token_reward_rejected": reward[1][mask[1]].mean(),
        }
        return LossOutput(loss=losses.mean(), rewards=self.config.beta * plain, metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``tgdpo``."""
    register(TGDPO)
