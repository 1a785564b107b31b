"""Flow-DPO — Diffusion-DPO for rectified-flow models (Improving Video Generation with Human Feedback, arXiv
2501.13918; the authors' implementation is flow_grpo's ``scripts/train_sd3_dpo.py``).

Per pair, with shared t (logit-normal) and ε, x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0 and e the element-mean
squared velocity error (ℓ = −½·e, the trainer's scorer):

    z = −(β_t/2)·[(e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)],   L = mean −log σ(z)

with a constant β_t = β (the paper's recommendation, flow_grpo's code) or the ELBO weighting β_t = β·(1 − t)²
(``beta_schedule: elbo``, t = σ; the paper's ablation, reported to reward-hack). The constant form is
``diffusion-dpo`` on a flow-matching scheduler; this plugin pins the flow target and the schedule option. The
weighting itself lives in the core: ``beta_schedule: elbo`` equals ``beta_schedule: constant`` with the core's
``training.weighting: flow_elbo`` (ℓ = −½(1 − σ)²·e; t and ε are shared by the pair), which any diffusion method can
use; do not set both (that weights by (1 − t)⁴).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trl_plus import (
    DiffusionDPO,
    DiffusionDPOConfig,
    LossContext,
    Paper,
    Scoring,
    dpo_losses,
    hookimpl,
)


class FlowDPOConfig(DiffusionDPOConfig):
    """Flow-DPO hyperparameters: Diffusion-DPO's, with flow_grpo's β and the β schedule."""

    beta: float = Field(100.0, gt=0, description="β in the ½ convention (flow_grpo config/dpo.py: 100; DenseDPO: 500)")
    beta_schedule: Literal["constant", "elbo"] = Field(
        "constant", description="constant β (paper's choice, flow_grpo) or β·(1 − t)² (the ELBO weighting, ablation)")


def elbo_factors(ctx: LossContext):
    """``[B]`` (1 − t)² per pair (the core's :func:`~trl_plus.flow_elbo_factor`), t = σ of the pair's shared draw
    (``ctx.outputs.noised.sigma``; rows 0..B−1 are the winners)."""
    from trl_plus import flow_elbo_factor  # torch-heavy: imported when a loss runs

    sigma = ctx.outputs.noised.sigma
    if sigma is None:
        raise ValueError("beta_schedule: elbo needs a flow-matching scheduler (σ per draw)")
    return flow_elbo_factor(sigma[: ctx.batch_size].to(ctx.token_logps.dtype))


class FlowDPO(DiffusionDPO):
    """Diffusion-DPO on the flow velocity: t and ε shared per pair; constant or ELBO-weighted β."""

    name = "flow-dpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "video", "source": "inferred"}
    family = "flow"
    paper = Paper("Improving Video Generation with Human Feedback", "2501.13918", code="yifan123/flow_grpo")
    summary = "Diffusion-DPO on rectified-flow velocity errors, constant β (or β(1−t)²), t and ε shared per pair"
    Config = FlowDPOConfig
    scoring = Scoring(targets=("flow",))
    example_model = {"kind": "diffusion", "name_or_path": "tiny-sd3"}

    def pair_losses(self, ctx: LossContext):
        """DPO's per-pair losses; with ``beta_schedule: elbo`` each pair's margin is scaled by (1 − t)²."""
        if self.config.beta_schedule == "constant":
            return super().pair_losses(ctx)
        ratios = self.log_ratios(ctx)
        return dpo_losses((ratios[0] - ratios[1]) * elbo_factors(ctx), self.config), ratios


@hookimpl
def register_methods(register):
    register(FlowDPO)
