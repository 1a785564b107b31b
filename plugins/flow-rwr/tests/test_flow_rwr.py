"""Flow-RWR: the card's worked example in all weight forms, its invariances, r = 0 is plain SFT (diffusion-sft on
the same draws), and no reference is ever computed."""

from __future__ import annotations

import math

import pytest
import torch
from trl_plus_flow_rwr import FlowRWR

from trl_plus import LossContext
from trl_plus.testing import (
    diffusion_batch,
    diffusion_loss,
    diffusion_rows,
    perturb,
    tiny_diffusion_trainer,
)

REWARDS, ERRORS = [0.5, -0.2, 1.0], [0.40, 0.50, 0.30]


def context(rewards, errors, groups=(0, 0, 0)):
    e = torch.tensor(errors, dtype=torch.float64).view(1, -1, 1).requires_grad_(True)
    batch = {"reward": torch.tensor(rewards, dtype=torch.float64), "prompt_ids": torch.tensor(groups)}
    return LossContext(token_logps=-0.5 * e, mask=torch.ones_like(e), batch=batch), e


@pytest.mark.parametrize("weighting, expected", [("exp", 0.628113), ("raw", 0.133333), ("softmax_group", 0.121123)])
def test_card_worked_example(weighting, expected):
    assert FlowRWR(weighting=weighting).loss(context(REWARDS, ERRORS)[0]).loss.item() == pytest.approx(expected, abs=1e-6)


def test_invariances():
    base = {w: FlowRWR(weighting=w).loss(context(REWARDS, ERRORS)[0]).loss.item() for w in ("exp", "softmax_group")}
    shifted = [r + 0.7 for r in REWARDS]
    assert FlowRWR(weighting="softmax_group").loss(context(shifted, ERRORS)[0]).loss.item() == pytest.approx(
        base["softmax_group"], abs=1e-12)
    assert FlowRWR().loss(context(shifted, ERRORS)[0]).loss.item() == pytest.approx(base["exp"] * math.exp(0.7))
    best = FlowRWR(weighting="best").loss(context(REWARDS, ERRORS, groups=(0, 0, 1))[0]).loss.item()
    assert best == pytest.approx((0.40 + 0.30) / 3)  # the best of group 0 (r 0.5) and the only sample of group 1
    ctx, e = context(REWARDS, ERRORS)
    FlowRWR().loss(ctx).loss.backward()
    assert e.grad.view(-1).tolist() == pytest.approx([math.exp(r) / 3 for r in REWARDS])


def test_zero_rewards_are_diffusion_sft_without_a_reference(tmp_path):
    rows = [{"prompt": r["prompt"], "x0": r["x0"][:1], "reward": 0.0} for r in diffusion_rows(4)]
    rwr = tiny_diffusion_trainer("flow-rwr", tmp_path / "r", target="flow", rows=rows, batch_size=4)
    sft = tiny_diffusion_trainer("diffusion-sft", tmp_path / "s", target="flow", rows=rows, batch_size=4,
                                 training={"share_timestep": False, "share_noise": False})  # fmt: skip
    assert rwr.reference_mode == sft.reference_mode == "none"
    for trainer in (rwr, sft):
        perturb(trainer.model, seed=1, scale=0.02)
    ours = diffusion_loss(rwr, diffusion_batch(rwr), seed=2).loss.item()
    assert ours == diffusion_loss(sft, diffusion_batch(sft), seed=2).loss.item() and ours > 0
