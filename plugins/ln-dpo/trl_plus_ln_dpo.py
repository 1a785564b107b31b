"""LN-DPO — length-normalized DPO (Ahrabian et al., "The Hitchhiker's Guide to Human Alignment with *PO",
arXiv 2407.15229; Findings of NAACL 2025 as "A Practical Analysis of Human Alignment with *PO").

DPO with each policy/reference log-ratio divided by its response's length |y| (completion tokens, EOS included):

    ρ(y) = ℓθ(y) − ℓref(y),   L = −log σ( β ( ρ(y_w)/|y_w| − ρ(y_l)/|y_l| ) ),   mean over pairs

This is TRL 1.16's ``DPOConfig(loss_type="sigmoid_norm")`` exactly. With equal lengths n it is DPO with β/n.
The implicit rewards (logged as ``rewards/*``) are the normalised β·ρ(y)/|y|.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trl_plus import DPO, LossContext, MethodConfig, Paper, hookimpl


class LNDPOConfig(MethodConfig):
    """LN-DPO hyperparameters: the paper's β grid was not available; β = 1 is a per-token-scale placeholder."""

    beta: float = Field(
        1.0, gt=0, description="β on the per-token log-ratio margin (placeholder 1.0; DPO's 0.1 is ~|y| times weaker)"
    )
    loss_type: Literal["sigmoid", "hinge"] = Field(
        "sigmoid", description="sigmoid = LN-DPO (TRL sigmoid_norm); hinge = max(0, 1 − βΔ) on the normalised margin"
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="ε of conservative DPO on the normalised margin, sigmoid only; 0 = LN-DPO"
    )


class LNDPO(DPO):
    """DPO on per-token (length-normalised) policy/reference log-ratios."""

    name = "ln-dpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": "length-bias", "scope": "text", "survey": ("length-bias",), "source": "survey"}
    paper = Paper("The Hitchhiker's Guide to Human Alignment with *PO", "2407.15229")
    summary = "DPO with each log-ratio divided by its response length (TRL sigmoid_norm)"
    Config = LNDPOConfig

    def log_ratios(self, ctx: LossContext):
        """``[K, B]`` (ℓθ − ℓref) / |y|, lengths counted on the completion mask (at least 1)."""
        return super().log_ratios(ctx) / ctx.lengths.clamp(min=1)


@hookimpl
def register_methods(register):
    """Register ``ln-dpo``."""
    register(LNDPO)
