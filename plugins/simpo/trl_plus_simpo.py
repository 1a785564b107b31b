"""SimPO — Simple Preference Optimization with a Reference-Free Reward (Meng et al., arXiv 2405.14734).

The reward of a response is its length-averaged log-likelihood under the policy, r̄(y) = (1/|y|) Σ_t log π(y_t|x,
y_<t); a target margin γ separates chosen from rejected. No reference model exists anywhere:

    L = −log σ( β (r̄(y_w) − r̄(y_l)) − γ )

Following the official trainer (``princeton-nlp/SimPO``, ``scripts/simpo_trainer.py``), the margin is given as
``gamma_beta_ratio`` = γ/β and the loss is written ``−log σ(β · (r̄_w − r̄_l − γ/β))``; ``label_smoothing`` ε gives
``−(1−ε) log σ(β·z) − ε log σ(−β·z)``, ``loss_type="hinge"`` gives ``max(0, 1 − β·z)``, and ``sft_weight`` adds
the chosen responses' cross-entropy averaged over all their tokens in the batch. |y| counts every completion token,
EOS included.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trl_plus import LossContext, LossOutput, Method, MethodConfig, Needs, Paper, hookimpl


class SimPOConfig(MethodConfig):
    """SimPO hyperparameters; defaults are the official ``scripts/simpo_config.py``."""

    beta: float = Field(2.0, gt=0, description="β, reward scale (official default 2.0; paper 2.0–2.5, v0.2 Llama3: 10)")
    gamma_beta_ratio: float = Field(
        0.25, ge=0, description="γ/β, target margin relative to β (official default 0.25; README: try 0–1, start 0.5)"
    )
    gamma: float | None = Field(
        None, ge=0, description="absolute margin γ (older configs); if set, replaces gamma_beta_ratio"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε, assumed label-flip rate (official default 0)")
    loss_type: Literal["sigmoid", "hinge"] = Field("sigmoid", description="sigmoid (SimPO) or hinge")
    sft_weight: float = Field(0.0, ge=0, description="weight of the chosen token-mean NLL term (official default 0)")

    @model_validator(mode="after")
    def _one_margin(self):
        if self.gamma is not None and "gamma_beta_ratio" in self.model_fields_set:
            raise ValueError("set either gamma (absolute) or gamma_beta_ratio (γ/β), not both")
        return self

    @property
    def margin_ratio(self) -> float:
        """γ/β, whichever way the margin was given."""
        return self.gamma / self.beta if self.gamma is not None else self.gamma_beta_ratio


class SimPO(Method):
    """Reference-free: Bradley–Terry on length-averaged log-likelihoods with a target margin."""

    name = "simpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "reference-free",
                "property": "length-bias", "scope": "text", "survey": ("reference-free", "length-bias"),
                "source": "survey"}
    paper = Paper(
        "SimPO: Simple Preference Optimization with a Reference-Free Reward", "2405.14734", code="princeton-nlp/SimPO"
    )
    summary = "reference-free; length-averaged log-likelihood reward with a target margin γ"
    needs = Needs(reference="no")
    Config = SimPOConfig

    def loss(self, ctx: LossContext) -> LossOutput:
        """Mean over pairs of the SimPO loss (plus ``sft_weight`` × chosen token-mean NLL); rewards β·r̄."""
        import torch.nn.functional as F

        c = self.config
        rewards = ctx.mean_logps()  # [2, B]: r̄(y_w), r̄(y_l)
        z = rewards[0] - rewards[1] - c.margin_ratio
        if c.loss_type == "sigmoid":
            losses = -(1 - c.label_smoothing) * F.logsigmoid(c.beta * z) - c.label_smoothing * F.logsigmoid(-c.beta * z)
        else:
            losses = (1 - c.beta * z).clamp(min=0)
        loss = losses.mean()
        metrics = {}
        if c.sft_weight > 0:
            sft = -ctx.logps()[0].sum() / ctx.lengths[0].sum().clamp(min=1)
            loss = loss + c.sft_weight * sft
            metrics["simpo/sft_loss"] = sft.detach()
        return LossOutput(loss=loss, rewards=c.beta * rewards.detach(), metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``simpo``."""
    register(SimPO)
