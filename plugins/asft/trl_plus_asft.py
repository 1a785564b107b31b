"""ASFT — Aligned Supervised Fine-Tuning through Absolute Likelihood (Wang et al., arXiv 2409.10571).

Reference-free and pointwise: the chosen response's likelihood is raised and the rejected one's lowered, each on
its own (no Bradley–Terry comparison). With the length-normalised sequence probability
p(y) = exp((1/|y|) Σ_t log πθ(y_t | x, y_<t)) and its log-odds r(y) = log p(y) − log(1 − p(y)):

    L = −log p(y_w) + λ · [ −log σ(β r(y_w)) − log σ(−β r(y_l)) ],   mean over pairs

With β = 1 (ASFT as published) σ(r) = p, so the alignment term is −log p(y_w) − log(1 − p(y_l)) and
L = −(1+λ) log p(y_w) − λ log(1 − p(y_l)). β ≠ 1 is the "tempered" ASFT of arXiv 2502.01237, and
``include_sft_term=False`` its two-stage form (alignment term only, after a separate SFT stage).
log(1 − p) is TRL ORPO's stable ``log1mexp`` with log p clamped to at most −ε (ε the dtype's machine epsilon), so
the loss and its gradient stay finite when p → 1.
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import LossContext, LossOutput, Method, MethodConfig, Needs, Paper, hookimpl


class ASFTConfig(MethodConfig):
    """ASFT hyperparameters (the ASFT paper's own values were not available; see the README)."""

    align_weight: float = Field(
        1.0,
        ge=0,
        description="λ, weight of the alignment term (arXiv 2502.01237 §5.1: best 1.0 in its grid 0.1, 0.2, 0.5, 1.0; "
        "turbo-alignment's ASFTLoss: lambda_=1.0)",
    )
    beta: float = Field(1.0, gt=0, description="β, temperature on the log-odds (1 = ASFT; <1 = tempered, arXiv 2502.01237)")
    include_sft_term: bool = Field(
        True, description="add −log p(y_w) (one-stage ASFT); false = alignment term only (two-stage, after SFT)"
    )
    length_normalize: bool = Field(
        True, description="p(y) from the mean token log-prob (ASFT, as ORPO); false = the summed log-prob"
    )


def log_one_minus_exp(logp):
    """log(1 − exp(logp)) for logp ≤ 0: TRL ORPO's two-branch ``log1mexp`` (log(−expm1) above −ln 2, log1p(−exp)
    below), with logp clamped to at most −ε (ε the dtype's machine epsilon) so that value and gradient stay finite
    up to logp = 0."""
    import math

    import torch

    logp = logp.clamp(max=-torch.finfo(logp.dtype).eps)
    return torch.where(logp < -math.log(2), torch.log1p(-torch.exp(logp)), torch.log(-torch.expm1(logp)))


def log_odds(logp):
    """r(y) = log p − log(1 − p) from log p (the argument of ORPO's and ASFT's sigmoids)."""
    return logp - log_one_minus_exp(logp)


class ASFT(Method):
    """Reference-free SFT plus a pointwise odds term: raise p(y_w) and lower p(y_l), each independently."""

    name = "asft"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "offline", "constraint.reference": "reference-free",
                "property": "likelihood-collapse", "scope": "text", "source": "inferred"}
    paper = Paper("ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood", "2409.10571")
    summary = "reference-free SFT + pointwise BCE on the odds of chosen (label 1) and rejected (label 0)"
    needs = Needs(reference="no")
    Config = ASFTConfig

    def loss(self, ctx: LossContext) -> LossOutput:
        """Mean over pairs of ``−log p(y_w) + λ·[−log σ(β r_w) − log σ(−β r_l)]``; rewards β·r (log-odds)."""
        import torch.nn.functional as F

        c = self.config
        logp = ctx.mean_logps() if c.length_normalize else ctx.logps()  # [2, B]: log p(y_w), log p(y_l)
        odds = c.beta * log_odds(logp)
        align = -F.logsigmoid(odds[0]) - F.logsigmoid(-odds[1])
        sft = -logp[0]
        losses = c.align_weight * align + (sft if c.include_sft_term else 0.0)
        return LossOutput(
            loss=losses.mean(),
            rewards=odds.detach(),
            metrics={"asft/sft_loss": sft.mean().detach(), "asft/align_loss": align.mean().detach()},
        )


@hookimpl
def register_methods(register):
    """Register ``asft``."""
    register(ASFT)
