"""RPO — Regularized Preference Optimization (Liu et al., arXiv 2405.16436, NeurIPS 2024).

"Your SFT loss is implicitly an adversarial regularizer": DPO plus a negative log-likelihood (SFT) term on the
chosen response, which the paper shows mitigates reward over-optimisation. The official repository ships two
normalisations of the SFT term, both offered here (``sft_normalization``):

- ``sequence_mean`` (OpenRLHF trainer, paper Appendix F, README: "generally better"; default):
  ``L = mean_i L_DPO,i + η · mean_i( −ℓθ(y_w,i) / |y_w,i| )``
- ``sum`` (alignment-handbook trainer, the paper's main experiments): per pair ``L_i = L_DPO,i − η·β·ℓθ(y_w,i)``
  (the code multiplies η by β: ``losses -= policy_chosen_logps * beta * eta``), averaged over pairs.
- ``token_mean`` (TRL's ``loss_type=["sigmoid", "sft"]``): ``η`` × the NLL averaged over every chosen token of
  the batch.

The SFT term reuses the chosen half of the policy forward: no extra pass. η = 0 is DPO exactly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trl_plus import DPO, DPOConfig, LossContext, LossOutput, Paper, hookimpl


class RPOConfig(DPOConfig):
    """RPO hyperparameters: DPO's plus the SFT weight and its normalisation (OpenRLHF ``train_rpo.sh`` defaults)."""

    beta: float = Field(0.5, gt=0, description="β, DPO temperature (OpenRLHF script: 0.5; handbook recipes 0.01/0.05)")
    eta: float = Field(
        0.2, ge=0, description="η, SFT weight (sequence_mean: 0.2, OpenRLHF script; sum: 0.005, handbook recipes)"
    )
    sft_normalization: Literal["sequence_mean", "sum", "token_mean"] = Field(
        "sequence_mean",
        description="sequence_mean: per-response mean NLL (OpenRLHF); sum: token-sum NLL weighted η·β "
        "(alignment-handbook, main paper); token_mean: TRL's sft loss",
    )


def sft_term(ctx: LossContext, config: RPOConfig):
    """The weighted chosen-response NLL term of the batch loss, for ``config.sft_normalization``."""
    chosen_logps, chosen_lengths = ctx.logps()[0], ctx.lengths[0]
    if config.sft_normalization == "sequence_mean":
        return config.eta * (-chosen_logps / chosen_lengths.clamp(min=1)).mean()
    if config.sft_normalization == "sum":
        return config.eta * config.beta * (-chosen_logps).mean()
    return config.eta * (-chosen_logps.sum() / chosen_lengths.sum().clamp(min=1))  # token_mean


class RPO(DPO):
    """DPO + η × SFT on the chosen responses."""

    name = "rpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "constraint.divergence": "generalization", "property": "distribution-shift", "scope": "text",
                "source": "inferred"}
    paper = Paper(
        "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer",
        "2405.16436",
        code="YSLIU627/Regularized-Preference-Optimization",
    )
    summary = "DPO plus a weighted SFT (NLL) term on the chosen response"
    Config = RPOConfig

    def loss(self, ctx: LossContext) -> LossOutput:
        """DPO's loss plus :func:`sft_term`; logs both parts (``rpo/dpo_loss``, ``rpo/sft_loss`` = the weighted
        term that is added) and DPO's rewards."""
        dpo = super().loss(ctx)
        sft = sft_term(ctx, self.config)
        return LossOutput(
            loss=dpo.loss + sft,
            rewards=dpo.rewards,
            metrics={"rpo/dpo_loss": dpo.loss.detach(), "rpo/sft_loss": sft.detach()},
        )


@hookimpl
def register_methods(register):
    """Register ``rpo``."""
    register(RPO)
