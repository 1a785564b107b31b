"""3D-Properties regularisers — Flex-DPO and SFT-regularised DPO (Yan et al., arXiv 2406.07327, ICLR 2025).

The paper traces DPO's *Drastic drop in rejected likelihood*, *Degradation into suppression* and *Dispersion to
unseen responses* to the rejected-side gradient, and proposes two regularisers (§3.3, Appendix B.2). With
token-sum log-ratios ρ(y) = ℓθ(y) − ℓref(y) of the chosen y_w and rejected y_l responses:

    Flex-DPO:                 L_i = −log σ(β₊ ρ(y_w) − β₋ ρ(y_l))            (β₋ < β₊ damps the rejected side)
    SFT-regularised (Eq. 7):  L_i = −log σ(β Δ_i) − γ ℓθ(y_w | x),           Δ_i = ρ(y_w) − ρ(y_l)

Both combine into one loss, averaged over the batch:

    L = mean_i [ −log σ(β₊ ρ(y_w) − β₋ ρ(y_l)) − γ ℓθ(y_w) ]

with ``beta_chosen`` = β₊ (β of Eq. 7 when the two are equal), ``beta_rejected`` = β₋ and ``sft_weight`` = γ.
β₊ = β₋ = β with γ = 0 is DPO exactly.
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import DPO, LossContext, LossOutput, MethodConfig, Paper, hookimpl


class ThreeDPropertiesConfig(MethodConfig):
    """Flex-DPO / SFT-regularised DPO hyperparameters (paper symbols β₊, β₋, γ)."""

    beta_chosen: float = Field(
        0.1, gt=0, description="β₊, temperature on the chosen log-ratio (paper: 0.1, the vanilla-DPO β)"
    )
    beta_rejected: float = Field(
        0.08,
        gt=0,
        description="β₋, temperature on the rejected log-ratio; = beta_chosen is DPO (paper: 0.08 best on MATH "
        "and poems; 0.01 also worked for math)",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="γ of Eq. 7, weight of the chosen token-sum NLL; 0 = off (paper gives no value)",
    )


class ThreeDProperties(DPO):
    """DPO with separate temperatures for the chosen and rejected log-ratios plus an optional chosen NLL term."""

    name = "three-d-properties"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": "likelihood-collapse", "scope": "text", "survey": ("likelihood-collapse",),
                "source": "survey"}
    paper = Paper("3D-Properties: Identifying Challenges in DPO and Charting a Path Forward", "2406.07327")
    summary = "Flex-DPO (β₊ chosen, β₋ rejected) and SFT-regularised DPO (− γ ℓθ(y_w))"
    Config = ThreeDPropertiesConfig

    def loss(self, ctx: LossContext) -> LossOutput:
        """Flex-DPO term plus γ × the chosen NLL; logs both parts and the rewards ``[β₊ ρ_w, β₋ ρ_l]``."""
        import torch
        import torch.nn.functional as F

        ratios = self.log_ratios(ctx)  # [2, B]: ρ(y_w), ρ(y_l)
        betas = torch.tensor([self.config.beta_chosen, self.config.beta_rejected], dtype=ratios.dtype,
                             device=ratios.device)  # fmt: skip
        rewards = betas[:, None] * ratios
        preference = -F.logsigmoid(rewards[0] - rewards[1]).mean()
        sft = self.config.sft_weight * (-ctx.logps()[0]).mean()
        return LossOutput(
            loss=preference + sft,
            rewards=rewards.detach(),
            metrics={"three_d/flex_dpo_loss": preference.detach(), "three_d/sft_loss": sft.detach()},
        )


@hookimpl
def register_methods(register):
    """Register ``three-d-properties``."""
    register(ThreeDProperties)
