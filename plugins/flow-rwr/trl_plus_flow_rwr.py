"""Flow-RWR — reward-weighted regression for rectified-flow models (Improving Video Generation with Human Feedback,
arXiv 2501.13918; the text-to-image implementation of the family: flow_grpo ``scripts/train_sd3_sft.py`` with
``flow_grpo/stat_tracking.py``). The ordinary velocity-matching loss, each sample weighted by its reward:

    L = mean_i  w_i · e_θ(x0_i),   e = element-mean (v̂ − v)²,  v = ε − x0

``weighting``: ``exp`` (w = exp(r/τ), the paper), ``softmax_group`` (softmax of r/τ over the samples of one prompt
in the batch, the Flow-GRPO paper's baseline), ``raw`` (w = r, flow_grpo's ``rwr`` branch; negative rewards
un-learn) or ``best`` (1 for the best sample of its prompt, else 0: best-of-N SFT, flow_grpo's ``sft``).
Reference-free, one policy forward per sample.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trl_plus import (
    DiffusionMethod,
    LossContext,
    LossOutput,
    MethodConfig,
    Needs,
    Paper,
    Scoring,
    denoising_errors,
    hookimpl,
)


class FlowRWRConfig(MethodConfig):
    """Flow-RWR hyperparameters: the weight form and its temperature."""

    weighting: Literal["exp", "softmax_group", "raw", "best"] = Field(
        "exp", description="w = exp(r/τ) (paper), softmax over the prompt's samples, raw r (flow_grpo rwr), best-only")
    temperature: float = Field(1.0, gt=0, description="τ in exp(r/τ) and the softmax (paper: exp(r), τ = 1)")


def sample_weights(rewards, groups, weighting: str, temperature: float = 1.0):
    """``[N]`` weights of the samples with ``rewards`` ``[N]``; ``groups`` ``[N]`` (prompt ids) for the per-group
    forms."""
    import torch

    scaled = rewards / temperature
    if weighting == "exp":
        return torch.exp(scaled)
    if weighting == "raw":
        return rewards
    weights = torch.zeros_like(rewards)
    for group in torch.unique(groups):
        members = groups == group
        if weighting == "softmax_group":
            weights[members] = torch.softmax(scaled[members], dim=0)
        else:  # best: every sample tied for the maximum gets 1
            weights[members] = (rewards[members] == rewards[members].max()).to(rewards.dtype)
    return weights


class FlowRWR(DiffusionMethod):
    """Reward-weighted flow matching on (prompt, image, reward) rows; no reference."""

    name = "flow-rwr"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "offline", "constraint.reference": "reference-free",
                "property": (), "scope": "video", "source": "inferred"}
    family = "flow"
    paper = Paper("Improving Video Generation with Human Feedback", "2501.13918", code="yifan123/flow_grpo")
    summary = "reward-weighted regression: mean w(r)·e of flow-velocity errors (exp / group softmax / raw / best)"
    needs = Needs(reference="no", fields=("reward",), precomputable_reference=False)
    Config = FlowRWRConfig
    scoring = Scoring(targets=("flow",), share_timestep=False, share_noise=False)
    data_fields = ("prompt", "image")
    image_fields = ("image",)
    batch_fields = ("reward",)
    sequences_per_example = 1
    example_data = {"path": "recipes/data/diffusion_rewards.jsonl"}
    example_model = {"kind": "diffusion", "name_or_path": "tiny-sd3"}

    def loss(self, ctx: LossContext) -> LossOutput:
        """mean w·e over the batch's samples (weights without gradient); logs the mean weight."""
        errors = denoising_errors(ctx)[0][0]
        rewards = ctx.batch["reward"].to(errors.dtype)
        groups = ctx.batch.get("prompt_ids")
        groups = groups if groups is not None else rewards.new_zeros(rewards.shape, dtype=rewards.dtype)
        weights = sample_weights(rewards, groups, self.config.weighting, self.config.temperature).detach()
        return LossOutput((weights * errors).mean(), metrics={"rwr/weight": weights.mean(), "rwr/mse": errors.detach().mean()})


@hookimpl
def register_methods(register):
    register(FlowRWR)
