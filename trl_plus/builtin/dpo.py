"""DPO — Direct Preference Optimization (Rafailov et al., 2023, arXiv 2305.18290).

Per pair, with sequence log-probs summed over completion tokens and the reference under no-grad:

    ρ = ℓθ(y) − ℓref(y),   Δ = ρ_w − ρ_l,   L = −log σ(β Δ)            (loss_type="sigmoid", default)

Variants from the official ``preference_loss``: conservative DPO (``label_smoothing`` ε):
``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``; IPO ``(Δ − 1/(2β))²`` (TRL's per-token-normalised Δ by default,
``ipo_normalize_by_length=False`` for the official token-sum form); hinge ``max(0, 1 − βΔ)``.
With ``label_smoothing=0`` and ``loss_type="sigmoid"`` the loss equals TRL 1.16 ``DPOTrainer`` exactly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..contract import LossContext, LossOutput, Method, MethodConfig, Needs, Paper


class DPOConfig(MethodConfig):
    """DPO hyperparameters (defaults: TRL 1.16 / the paper's README example)."""

    beta: float = Field(0.1, gt=0, description="β, inverse strength of the implicit KL anchor (README: 0.1–0.5)")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="sigmoid = DPO; ipo = IPO; hinge = SLiC-style max(0, 1 − βΔ)"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="ε of conservative DPO (cDPO), sigmoid loss only; 0 = plain DPO"
    )
    ipo_normalize_by_length: bool = Field(
        True, description="IPO only: divide each log-ratio by its completion length (TRL) or not (official code)"
    )


def dpo_losses(delta, config: DPOConfig):
    """Per-pair losses (``[B]``) of the log-ratio difference ``delta`` (``[B]``) for ``config.loss_type``."""
    import torch.nn.functional as F

    beta, eps = config.beta, config.label_smoothing
    if config.loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if config.loss_type == "hinge":
        return (1 - beta * delta).clamp(min=0)
    return (delta - 1 / (2 * beta)) ** 2  # ipo


class DPO(Method):
    """Logistic (Bradley–Terry) loss on the difference of policy/reference log-ratios of chosen and rejected."""

    name = "dpo"
    taxonomy = {"data.feedback": "pair", "data.granularity": "sentence", "learning.paradigm": "offline",
                "constraint.reference": "fixed", "property": (), "scope": "text", "survey": ("basic",),
                "source": "survey"}
    family = "offline-pairwise"
    paper = Paper(
        "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        "2305.18290",
        code="eric-mitchell/direct-preference-optimization",
    )
    summary = "Bradley–Terry loss on policy/reference log-ratio margins of chosen vs rejected"
    needs = Needs(reference="yes")
    Config = DPOConfig

    def log_ratios(self, ctx: LossContext):
        """``[K, B]`` policy − reference sequence log-probs (subclasses change how a sequence is scored)."""
        return ctx.logps() - ctx.ref_logps()

    def pair_losses(self, ctx: LossContext):
        """``([B] per-pair losses, [K, B] log-ratios)``: the override point for methods that weight pairs."""
        ratios = self.log_ratios(ctx)
        if self.config.loss_type == "ipo" and self.config.ipo_normalize_by_length:
            ratios_for_delta = ratios / ctx.lengths.clamp(min=1)
        else:
            ratios_for_delta = ratios
        return dpo_losses(ratios_for_delta[0] - ratios_for_delta[1], self.config), ratios

    def loss(self, ctx: LossContext) -> LossOutput:
        """The batch mean of :meth:`pair_losses`; rewards ``β · log-ratios``."""
        losses, ratios = self.pair_losses(ctx)
        return LossOutput(loss=losses.mean(), rewards=self.config.beta * ratios.detach())
