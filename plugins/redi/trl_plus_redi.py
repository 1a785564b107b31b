"""REDI — Reinforcement Distillation (Xu et al., "Harnessing Negative Signals: Reinforcement Distillation from Teacher
Data for LLM Reasoning", arXiv 2505.24850).

Stage 2 of a two-stage recipe (stage 1: the core ``sft`` on correct teacher traces). Reference-free and linear in
the length-normalised log-likelihoods of a correct trace y_w and an incorrect trace y_l (paper Eq. 5):

    L = −c · ℓθ(y_w)/|y_w| + α · ℓθ(y_l)/|y_l|,   mean over pairs

with ℓθ the summed completion log-prob and |y| the completion token count (EOS included, clamped at ≥ 1), exactly
the official ``loss_type="reinforce"`` (``Tim-Siu/reinforcement-distillation``, ``trl/trl/trainer/dpo2_trainer.py``:
c = ``reinforce_chosen_coef`` = 1, α = ``reinforce_rejected_coef`` = 0.8). No sigmoid, no margin: the loss is
unbounded below. α = 0 is per-sequence-mean SFT on y_w; α = 1 the symmetric objective. The official code's
optional negative weighting (off by default, not in the paper) multiplies the rejected term by
exp(γ·ℓθ(y_l)/|y_l|), gradient included.
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import LossContext, LossOutput, Method, MethodConfig, Needs, Paper, hookimpl


class REDIConfig(MethodConfig):
    """REDI hyperparameters; defaults are the paper's best (α = 0.8) and the official stage-2 config."""

    alpha: float = Field(
        0.8, ge=0, description="α, weight of the incorrect-trace term (paper best 0.8; explored 0.2, 0.5, 0.8, 1.0)"
    )
    chosen_coef: float = Field(1.0, ge=0, description="weight of the correct-trace term (official reinforce_chosen_coef 1.0)")
    neg_weighting: bool = Field(
        False, description="official code only (use_neg_weighting): scale the α term by exp(γ ℓθ(y_l)/|y_l|)"
    )
    neg_weighting_gamma: float = Field(
        1.0, description="γ of neg_weighting (official neg_weighting_gamma 1.0); unused when neg_weighting is off"
    )


class REDI(Method):
    """Reference-free, asymmetric: raise the mean log-likelihood of correct traces, lower (α-weighted) incorrect ones."""

    name = "redi"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "reference-free",
                "property": "likelihood-collapse", "scope": "text", "source": "inferred"}
    paper = Paper(
        "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning",
        "2505.24850",
        code="Tim-Siu/reinforcement-distillation",
    )
    summary = "reference-free; −ℓ(y_w)/|y_w| + α ℓ(y_l)/|y_l| on correct/incorrect teacher traces (after SFT)"
    needs = Needs(reference="no")
    Config = REDIConfig

    def loss(self, ctx: LossContext) -> LossOutput:
        """Mean over pairs of ``−c·ℓ̄(y_w) + α·w·ℓ̄(y_l)`` (ℓ̄ the mean token log-prob, w the optional negative weight);
        rewards ℓ̄ (detached), as the official trainer logs them."""
        import torch

        c = self.config
        normalized = ctx.mean_logps()  # [2, B]: ℓθ(y)/|y|
        chosen_term = -c.chosen_coef * normalized[0]
        rejected_term = c.alpha * normalized[1]
        metrics = {}
        if c.neg_weighting:
            weights = torch.exp(c.neg_weighting_gamma * normalized[1])
            rejected_term = rejected_term * weights
            metrics["redi/neg_weights"] = weights.mean().detach()
        metrics["redi/chosen_term"] = chosen_term.mean().detach()
        metrics["redi/rejected_term"] = rejected_term.mean().detach()
        return LossOutput(loss=(chosen_term + rejected_term).mean(), rewards=normalized.detach(), metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``redi``."""
    register(REDI)
