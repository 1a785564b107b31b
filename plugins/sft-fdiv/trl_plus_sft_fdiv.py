"""SFT-fdiv — supervised fine-tuning with an f-divergence to the reference ("Implicit Reward as the Bridge: A Unified
View of SFT and DPO Connections", arXiv 2507.00018).

The paper (abstract only; its equations were not found) says that in plain SFT the KL term of the distribution-
matching objective is constant in the policy, so nothing holds the model near its start, and proposes SFT objectives
"from various f-divergence functions that preserve the KL term". **The forms below are inferred** (the card's, from
f-DPO's implicit reward r = β·f′(πθ/πref) and TRL's ``f_divergence_type`` scores): with the demonstration's log-ratio
ρ = log πθ(y|x) − log πref(y|x) (the reference frozen),

    L = −mean s_f(ρ)
    reverse KL:        s(ρ) = ρ                              = SFT NLL + a constant: exactly SFT's gradient
    forward KL:        s(ρ) = 1 − e^{−ρ}                     (experimental)
    Jensen–Shannon:    s(ρ) = log 2 + log σ(ρ)               (experimental)
    α-divergence:      s(ρ) = (e^{(α−1)ρ} − 1)/(α − 1)       (experimental)

Each s is 0 at ρ = 0 (the loss is 0 at initialisation) and increasing; the gradient on a token's log-prob is SFT's
times s′(ρ): 1 for reverse KL, e^{−ρ} (forward KL), σ(−ρ) (JS), e^{(α−1)ρ} (α) — the experimental forms weaken as
the policy rises above the reference (a reference-anchored SFT). ``granularity`` says what ρ is: per token
(default; the mean runs over all completion tokens of the batch, as ``sft``'s token-mean NLL), per sequence (the
token sum; the card's worked example) or per sequence averaged over its tokens.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trl_plus import SFT, LossContext, LossOutput, MethodConfig, Needs, Paper, hookimpl

EXPERIMENTAL = ("forward_kl", "js_divergence", "alpha_divergence")


class SFTFDivConfig(MethodConfig):
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="the f-divergence score s_f (paper: not found; reverse_kl = SFT's gradient; the others "
        "are inferred and need experimental: true)")  # fmt: skip
    alpha: float = Field(0.5, gt=0, description="α of alpha_divergence (TRL's default 0.5; α = 1 is reverse KL)")
    granularity: Literal["token", "sequence", "sequence_mean"] = Field(
        "token", description="ρ per token (mean over the batch's completion tokens; the card's recommendation), per "
        "sequence (token sum) or per sequence averaged over its tokens (paper: not found)")  # fmt: skip
    experimental: bool = Field(False, description="allow the inferred f-forms (forward_kl, js_divergence, "
                               "alpha_divergence): not the paper's published equations")  # fmt: skip

    @model_validator(mode="after")
    def _check(self):
        if self.f_divergence in EXPERIMENTAL and not self.experimental:
            raise ValueError(f"f_divergence {self.f_divergence!r} is our inferred form, not the paper's (its equations "
                             "were not found): set experimental: true to use it")  # fmt: skip
        if self.f_divergence == "alpha_divergence" and self.alpha == 1:
            raise ValueError("alpha = 1 makes alpha_divergence 0/0: it is reverse_kl, use that")
        return self


def f_score(rho, f_divergence: str, alpha: float = 0.5):
    """s_f(ρ) elementwise (0 at ρ = 0, increasing)."""
    import torch
    import torch.nn.functional as F

    if f_divergence == "reverse_kl":
        return rho
    if f_divergence == "forward_kl":
        return -torch.expm1(-rho)
    if f_divergence == "js_divergence":
        return F.logsigmoid(rho) + torch.log(rho.new_tensor(2.0))
    return torch.expm1((alpha - 1) * rho) / (alpha - 1)


def f_weight(rho, f_divergence: str, alpha: float = 0.5):
    """s_f′(ρ): the factor on SFT's gradient of each log-prob."""
    import torch

    if f_divergence == "reverse_kl":
        return torch.ones_like(rho)
    if f_divergence == "forward_kl":
        return torch.exp(-rho)
    if f_divergence == "js_divergence":
        return torch.sigmoid(-rho)
    return torch.exp((alpha - 1) * rho)


class SFTFDiv(SFT):
    """SFT with an f-divergence to the frozen reference: L = −mean s_f(log πθ − log πref) over the completion (tokens by
    default); reverse KL is SFT's gradient exactly, the other forms are inferred (experimental)."""

    name = "sft-fdiv"
    taxonomy = {"data.feedback": (), "learning.paradigm": "offline", "constraint.reference": "fixed",
                "constraint.divergence": "generalization", "property": "other-analysis", "scope": "text",
                "source": "inferred"}
    family = "supervised"
    paper = Paper("Implicit Reward as the Bridge: A Unified View of SFT and DPO Connections", "2507.00018")
    summary = "SFT with an f-divergence to the reference: −mean s_f(log πθ − log πref); reverse KL = SFT (others inferred)"
    needs = Needs(reference="yes")
    Config = SFTFDivConfig

    def log_ratios(self, ctx: LossContext):
        """``(ρ, weights)``: the log-ratios the loss averages and the weight of each in the mean (token: ``[1, B, T]``
        with the mask as weights; sequence: ``[1, B]`` with the sequence mask)."""
        token = (ctx.token_logps - ctx.ref_token_logps) * ctx.mask
        if self.config.granularity == "token":
            return token, ctx.mask
        rho = token.sum(-1)
        if self.config.granularity == "sequence_mean":
            rho = rho / ctx.lengths.clamp(min=1)
        return rho, ctx.sequence_mask * (ctx.lengths > 0)

    def loss(self, ctx: LossContext) -> LossOutput:
        c = self.config
        rho, weights = self.log_ratios(ctx)
        total = weights.sum().clamp(min=1)
        loss = -(f_score(rho, c.f_divergence, c.alpha) * weights).sum() / total
        rho_ = rho.detach()
        tokens = ctx.mask.sum().clamp(min=1)
        metrics = {
            "sft/nll": (-(ctx.token_logps * ctx.mask).sum() / tokens).detach(),
            "sft_fdiv/log_ratio": (rho_ * weights).sum() / total,
            "sft_fdiv/weight": (f_weight(rho_, c.f_divergence, c.alpha) * weights).sum() / total,
        }
        return LossOutput(loss=loss, metrics=metrics)


@hookimpl
def register_methods(register):
    register(SFTFDiv)
