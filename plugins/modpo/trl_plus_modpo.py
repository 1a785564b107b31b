"""MODPO — Multi-Objective Direct Preference Optimization (Zhou et al., Findings of ACL 2024, arXiv 2310.03708;
official code ZHZisZZ/modpo, ``src/trainer/modpo_trainer.py`` ``modpo_loss``).

DPO on the preferences of one objective (objective 0, e.g. helpfulness) with a margin built from the M−1 other
objectives' frozen rewards r_1..r_{M−1} of both responses, weighted by w = (w_0, w_1, …, w_{M−1}):

    r̂(y) = (1/w_0) · ( β·[ℓθ(y) − ℓref(y)] − Σ_{k≥1} w_k·r_k(x, y) )
    z    = r̂(y_w) − r̂(y_l) = (1/w_0) · ( βΔ − w_{1:}ᵀ(r(y_w) − r(y_l)) )
    L    = mean_i −log σ(z_i)   (sigmoid)   or   mean_i max(0, 1 − z_i)   (hinge)

ℓ are token-sum log-probs; 1/w_0 scales the whole logit, βΔ included. The margin rewards are constants (no
gradient): precomputed columns ``chosen_margin_rewards`` / ``rejected_margin_rewards`` (M−1 numbers per row), or
``margin: length`` (r_1 = −|y|, the response's token count, the official summarisation example). w = (1,) is DPO.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from trl_plus import (
    DPO,
    ListField,
    LossContext,
    LossOutput,
    MethodConfig,
    Needs,
    Paper,
    TrlPlusError,
    hookimpl,
)

logger = logging.getLogger(__name__)

#: The precomputed margin columns: per row, the M−1 margin rewards of the chosen and of the rejected response.
MARGIN_COLUMNS = ("chosen_margin_rewards", "rejected_margin_rewards")


class MODPOConfig(MethodConfig):
    """MODPO hyperparameters (defaults: the official safety example, ``scripts/modpo/beavertails``, w = 0.5)."""

    beta: float = Field(0.1, gt=0, description="β, DPO temperature (official scripts: 0.1)")
    margin: Literal["columns", "length"] = Field(
        "columns", description="where r_1..r_{M−1} come from: the data's margin columns, or length: r_1 = −|y| in tokens"
    )
    w: tuple[float, ...] = Field(
        (0.5, 0.5), min_length=1,
        description="objective weights (w_0 for the trained preferences, then one per margin reward; safety script: "
                    "(w, 1−w), w ∈ {0.1, 0.5, 0.9}; length script: (1, 0.1)); (1,) = DPO",
    )  # fmt: skip
    loss_type: Literal["sigmoid", "hinge"] = Field("sigmoid", description="sigmoid: −log σ(z); hinge: max(0, 1 − z)")

    @field_validator("w")
    @classmethod
    def _weights(cls, w: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        if not all(math.isfinite(v) for v in w):
            raise ValueError("every weight must be a finite number")
        if not w[0] > 0:
            raise ValueError("w[0], the weight of the preferences being trained, must be > 0 (z is divided by it)")
        if info.data.get("margin") == "length" and len(w) != 2:
            raise ValueError("margin: length has one margin reward (r_1 = −|y|): give two weights, e.g. [1.0, 0.1]")
        return w


def margin_rewards(ctx: LossContext, config: MODPOConfig):
    """``[2, B, M−1]`` margin rewards r_1..r_{M−1} of the chosen and the rejected responses (constants: no
    gradient), or ``None`` when w has one weight (no margin: DPO)."""
    import torch

    if len(config.w) == 1:
        return None
    if config.margin == "length":
        return -ctx.lengths.detach().unsqueeze(-1)  # r_1 = −|y|: scored tokens of the response
    missing = [name for name in MARGIN_COLUMNS if name not in ctx.batch]
    if missing:
        raise TrlPlusError(f"modpo: the batch has no {missing[0]!r} column; method_args.w = {list(config.w)} needs "
                           f"{len(config.w) - 1} margin reward(s) per response in {' and '.join(MARGIN_COLUMNS)}")  # fmt: skip
    logps = ctx.token_logps
    values = torch.stack([torch.as_tensor(ctx.batch[name]) for name in MARGIN_COLUMNS]).to(logps.device, logps.dtype)
    masks = [ctx.batch.get(name + "_mask") for name in MARGIN_COLUMNS]
    if values.shape[-1] != len(config.w) - 1 or any(m is not None and not bool(torch.as_tensor(m).all()) for m in masks):
        raise TrlPlusError(f"modpo: every row needs {len(config.w) - 1} margin reward(s) per response (method_args.w = "
                           f"{list(config.w)}); this batch has lists of another length")  # fmt: skip
    return values.detach()


class MODPO(DPO):
    """DPO on objective 0's preferences with the other objectives' weighted reward difference subtracted from the
    logit and the whole logit divided by w_0."""

    name = "modpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "learning.objective": "multi-objective",
                "constraint.reference": "fixed", "property": (), "scope": "text", "survey": ("multi-objective",),
                "source": "survey"}
    family = "multi-objective"
    paper = Paper(
        "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference Optimization",
        "2310.03708",
        code="ZHZisZZ/modpo",
    )
    summary = "DPO with a margin w_{1:}ᵀΔr from other objectives' frozen rewards, the logit scaled by 1/w_0"
    needs = Needs(
        reference="yes",
        list_fields=(
            ListField(MARGIN_COLUMNS[0], same_length_as=MARGIN_COLUMNS[1], required=False),
            ListField(MARGIN_COLUMNS[1], same_length_as=MARGIN_COLUMNS[0], required=False),
        ),
    )
    Config = MODPOConfig
    example_data = {"path": "recipes/data/modpo_sample.jsonl"}

    # -- data -----------------------------------------------------------------------------------------------
    def prepare_data(self, dataset, split: str):
        """Check the margin columns against ``w`` before any model loads (the rows are returned unchanged, so this is
        idempotent): with ``margin: columns`` and M−1 = len(w) − 1 > 0 both columns must be there and every list must
        hold M−1 numbers; with w = (1,) a margin list must be empty."""
        config = self.config
        present = [name for name in MARGIN_COLUMNS if name in dataset.column_names]
        needed = len(config.w) - 1 if config.margin == "columns" else 0
        if config.margin == "length" and present:
            logger.warning("modpo: margin: length ignores the data's columns %s", ", ".join(present))
            return dataset
        if needed and len(present) < len(MARGIN_COLUMNS):
            missing = [name for name in MARGIN_COLUMNS if name not in present]
            raise TrlPlusError(
                f"missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: method_args.w = "
                f"{list(config.w)} weighs {needed} margin reward(s) per response; add both columns (lists of {needed} "
                "number(s)), or set method_args.margin: length, or method_args.w: [1.0] for plain DPO"
            )
        for name in present:
            for row, values in enumerate(dataset[name], 1):
                if isinstance(values, list) and len(values) != needed:
                    raise TrlPlusError(
                        f"row {row}: column {name!r} has {len(values)} margin reward(s) but method_args.w = "
                        f"{list(config.w)} has {len(config.w)} weight(s): give len(w) − 1 = {needed} per response "
                        "(one per margin reward model), or change method_args.w"
                    )
        return dataset

    # -- the objective --------------------------------------------------------------------------------------
    def logits(self, ctx: LossContext):
        """``(z [B], r̂ [2, B], βΔ [B], w_{1:}ᵀΔr [B])``: the MODPO logit, each response's reward r̂(y), the DPO
        logit and the margin offset."""
        import torch

        w, beta = self.config.w, self.config.beta
        ratios = self.log_ratios(ctx)  # [2, B] ℓθ − ℓref
        rewards = margin_rewards(ctx, self.config)
        if rewards is None:
            offsets = torch.zeros_like(ratios)
        else:
            offsets = rewards @ torch.tensor(w[1:], dtype=ratios.dtype, device=ratios.device)  # [2, B] w_{1:}ᵀ r(y)
        beta_delta, offset = beta * (ratios[0] - ratios[1]), offsets[0] - offsets[1]
        return (beta_delta - offset) / w[0], (beta * ratios - offsets) / w[0], beta_delta, offset

    def pair_losses(self, ctx: LossContext):
        """``([B] per-pair losses, [2, B] log-ratios)``."""
        return self._losses(self.logits(ctx)[0]), self.log_ratios(ctx)

    def _losses(self, z):
        import torch.nn.functional as F

        return -F.logsigmoid(z) if self.config.loss_type == "sigmoid" else (1 - z).clamp(min=0)

    def loss(self, ctx: LossContext) -> LossOutput:
        """The batch mean of the per-pair losses; rewards are r̂(y) (so ``rewards/margins`` is z, as in the official
        trainer); logs βΔ and the margin offset w_{1:}ᵀΔr."""
        z, rewards, beta_delta, offset = self.logits(ctx)
        return LossOutput(
            loss=self._losses(z).mean(),
            rewards=rewards.detach(),
            metrics={"modpo/dpo_margin": beta_delta.detach().mean(), "modpo/margin_offset": offset.detach().mean()},
        )


@hookimpl
def register_methods(register):
    """Register ``modpo``."""
    register(MODPO)
