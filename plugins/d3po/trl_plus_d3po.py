"""D3PO — Direct Preference for Denoising Diffusion Policy Optimization (Using Human Feedback to Fine-tune Diffusion
Models without Any Reward Model, arXiv 2311.13231, CVPR 2024; official code yk7333/d3po ``scripts/rm/train_d3po.py``,
``d3po_pytorch/diffusers_patch/ddim_with_logprob.py``).

The policy samples n images per prompt from one shared x_T with a stochastic DDIM sampler (20 steps, η = 1, CFG 5),
recording every step. Each pair of a group is labelled by its scores (Pareto dominance, the official ``compare``;
ties and non-dominated pairs are dropped), and every denoising step of the pair is one DPO term on the element-mean
DDIM step log-density ℓ = log p(x_{t−1} | x_t) of the stored transition (scored by the core, CFG-guided):

    r_k = clip(exp(ℓ_θ,k − ℓ_ref,k), 1 − ε, 1 + ε),   L = −log σ(β·(log r_w − log r_l))   (mean over pairs × steps)

A ratio outside the clip gives its image no gradient.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import Field

from trl_plus import (
    DiffusionMethod,
    LossContext,
    LossOutput,
    MethodConfig,
    Needs,
    Paper,
    Rollout,
    Scoring,
    TrlPlusError,
    hookimpl,
)

#: The official sampler (config/base.py: sample.num_steps 20, sample.eta 1.0, sample.guidance_scale 5.0).
D3PO_DECODING = {"steps": 20, "eta": 1.0, "guidance": 5.0}


class D3POConfig(MethodConfig):
    """D3PO hyperparameters (official ``config/base.py``)."""

    beta: float = Field(0.1, gt=0, description="β, the DPO temperature (train.beta 0.1)")
    eps: float = Field(0.1, gt=0, lt=1, description="ε, the ratio clip [1 − ε, 1 + ε] (train.eps 0.1)")
    timestep_fraction: float = Field(
        1.0, gt=0, le=1, description="share of each pair's denoising steps trained, a random subset per pair "
                                     "(train.timestep_fraction 1.0: all)")  # fmt: skip
    compare: Literal["pareto", "reward"] = Field(
        "pareto", description="pareto: the official compare() on the weighted score vector (one scorer: the higher "
                              "wins); reward: the weighted reward sum")  # fmt: skip


def preference(a, b) -> tuple[int, int]:
    """The official ``compare`` of two score vectors (image 0's ``a``, image 1's ``b``, higher is better): ``(−1, +1)``
    when b dominates a (≥ everywhere, > somewhere), ``(+1, −1)`` when a dominates b, ``(0, 0)`` otherwise (a tie or
    neither dominates)."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if bool((a <= b).all()) and bool((a < b).any()):
        return (-1, 1)
    if bool((b <= a).all()) and bool((b < a).any()):
        return (1, -1)
    return (0, 0)


def d3po_losses(logps, ref_logps, signs, beta: float, eps: float):
    """``([B] per-term losses, [2, B] clipped log-ratios)``: −log σ(β·(h0·log r_0 + h1·log r_1)) with
    r_k = clip(exp(ℓ_k − ℓ_ref,k), 1 − ε, 1 + ε); ``logps`` / ``ref_logps`` ``[2, B]``, ``signs`` h ``[2, B]`` (or
    ``[2]``) in {+1, 0, −1} (the official loss, which takes the labels as they come). The clip is applied to the
    log-ratio, log r = clamp(ℓ − ℓ_ref, log(1 − ε), log(1 + ε)): the same value and gradient as the official
    clamp(exp(·)), without exp's overflow (inf · 0 = NaN gradients) on a far-off step."""
    import math

    import torch
    import torch.nn.functional as F

    log_ratios = torch.clamp(logps - ref_logps, math.log(1 - eps), math.log(1 + eps))
    signs = torch.as_tensor(signs, dtype=log_ratios.dtype, device=log_ratios.device)
    if signs.dim() == 1:
        signs = signs.view(2, *([1] * (log_ratios.dim() - 1)))
    z = beta * (signs[0] * log_ratios[0] + signs[1] * log_ratios[1])
    return -F.logsigmoid(z), log_ratios


def step_rows(trajectory, a: int, b: int, prompt_id: int, steps) -> list[dict[str, Any]]:
    """One transition row per step ``j`` in ``steps`` of images ``a`` (the winner, index 0) and ``b`` of a recorded
    ``trajectory``: ``{"prompt_id", "transition": {"x_t" [2, ...], "x_prev" [2, ...], "timestep" [2],
    "prev_timestep" [2]}}``."""
    import torch

    rows = []
    for j in steps:
        t, prev = trajectory.timesteps[j], trajectory.prev_timesteps[j]
        rows.append({"prompt_id": prompt_id, "transition": {
            "x_t": torch.stack([trajectory.latents[j, a], trajectory.latents[j, b]]).cpu(),
            "x_prev": torch.stack([trajectory.latents[j + 1, a], trajectory.latents[j + 1, b]]).cpu(),
            "timestep": torch.stack([t, t]).cpu(), "prev_timestep": torch.stack([prev, prev]).cpu()}})  # fmt: skip
    return rows


class D3PO(DiffusionMethod):
    """Online step-wise DPO: pairs from one shared x_T, every recorded DDIM step a clipped-ratio DPO term."""

    name = "d3po"
    taxonomy = {"data.feedback": "pair", "data.granularity": "step", "learning.paradigm": "online",
                "constraint.reference": "fixed", "property": (), "scope": "image", "source": "inferred"}
    paper = Paper("Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model", "2311.13231",
                  code="yk7333/d3po")  # fmt: skip
    summary = "online DPO per denoising step of shared-x_T sample pairs, ratios clipped to [1 − ε, 1 + ε]"
    needs = Needs(reference="yes", precomputable_reference=False, rollout=Rollout(n=2, decoding=D3PO_DECODING))
    Config = D3POConfig
    scoring = Scoring(targets=("epsilon",), source="transitions")
    data_fields = ("prompt",)
    image_fields = ()
    record = True
    share_start = True
    example_data = {"path": "recipes/data/online_prompts.jsonl"}
    #: ``trl-plus show``'s example rollout: a latent scorer (no VAE) and a short sampler for the tiny model.
    example_rollout = {"decoding": {"steps": 4}, "scorers": [{"name": "latent-mean"}]}

    def make_examples(self, rollouts) -> list[dict[str, Any]]:
        """For every pair of a prompt's images (C(n, 2)) with a decided preference (see :func:`preference`), one
        transition row per trained step (all, or a random ``timestep_fraction`` per pair), the winner first. Steps
        with σ_t = 0 (a deterministic last step, where the schedule's final ᾱ is 1) have no density and are skipped."""
        import torch

        trajectory = rollouts.trajectory
        if trajectory is None:
            raise TrlPlusError("d3po: the rollout has no trajectory; keep record = True (D3PO trains on the "
                               "recorded sampler steps)")  # fmt: skip
        weights = rollouts.weights.to(rollouts.scores.dtype)
        if self.config.compare == "reward":
            values = rollouts.reward().unsqueeze(-1)
        else:  # weighted scores, so that a negative weight means lower is better; weight-0 outputs left out
            kept = weights != 0
            values = torch.nan_to_num(rollouts.scores[:, kept] * weights[kept])
        # a step with σ_t = 0 (the last one, on a schedule whose final ᾱ is 1) is deterministic: no density, left out
        usable = trajectory.stochastic_steps()
        total = len(usable)
        trained = max(1, int(trajectory.steps * self.config.timestep_fraction))
        rows = []
        for g in range(rollouts.num_groups):
            for a, b in itertools.combinations(rollouts.rows_of(g), 2):
                h = preference(values[a], values[b])
                if h == (0, 0):
                    continue
                winner, loser = (a, b) if h[0] > 0 else (b, a)
                steps = usable if trained >= total else [usable[i] for i in torch.randperm(total)[:trained].tolist()]
                rows += step_rows(trajectory, winner, loser, int(rollouts.prompt_ids[a]), steps)
        return rows

    def loss(self, ctx: LossContext) -> LossOutput:
        """The clipped step-wise DPO loss, mean over the rows (winner index 0); logs the share of clipped ratios."""
        if ctx.ref_token_logps is None:
            raise TrlPlusError("d3po needs the reference's step log-densities: set reference.mode to auto, adapter "
                               "or model (not none)")  # fmt: skip
        logps, ref_logps = ctx.logps(), ctx.ref_logps()
        losses, log_ratios = d3po_losses(logps, ref_logps, (1, -1), self.config.beta, self.config.eps)
        ratios = (logps - ref_logps).detach().exp()
        clipped = (ratios < 1 - self.config.eps) | (ratios > 1 + self.config.eps)
        return LossOutput(losses.mean(), rewards=self.config.beta * log_ratios.detach(),
                          metrics={"d3po/clipped": clipped.float().mean()})  # fmt: skip


@hookimpl
def register_methods(register):
    register(D3PO)
