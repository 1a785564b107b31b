"""DSO-DRO: the card's worked example and gradients, the guard, no reference ever computed, t shared and ε
independent, and the DPO variant (flow-dpo with independent noise) on the card's numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from trl_plus_dso_dro import DSODRO

from trl_plus import get_method
from trl_plus.testing import (
    diffusion_rows,
    make_context,
    tiny_diffusion_trainer,
    training_logs,
)


def errors_context(positive, negative, reference=None):
    ell = lambda values: [[-0.5 * v] for v in values]  # noqa: E731 (ℓ = −½·e)
    ref = None if reference is None else [ell(reference[0]), ell(reference[1])]
    return make_context([ell(positive), ell(negative)], ref)


def test_card_worked_example_and_constant_gradients():
    ctx = errors_context([0.30, 0.25], [0.45, 0.20])
    out = DSODRO().loss(ctx)
    assert out.loss.item() == pytest.approx(-0.05, abs=1e-12)
    out.loss.backward()
    # ∂L/∂e⁺ = +1/B, ∂L/∂e⁻ = −1/B; ℓ = −½·e, so ∂L/∂ℓ = −2·∂L/∂e
    assert torch.allclose(ctx.token_logps.grad[..., 0], torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64))


def test_the_guard_caps_the_loser_error():
    ctx = errors_context([0.30, 0.25], [0.45, 0.20])
    out = DSODRO(loser_error_cap=0.4).loss(ctx)
    assert out.loss.item() == pytest.approx((0.30 - 0.40 + 0.25 - 0.20) / 2)
    out.loss.backward()
    assert ctx.token_logps.grad[1, 0, 0] == 0 and ctx.token_logps.grad[1, 1, 0] != 0


def test_dpo_variant_is_flow_dpo(monkeypatch):
    # example 1 of the card: e⁺ 0.30, e⁻ 0.45, e_ref⁺ 0.31, e_ref⁻ 0.44, β = 500 → z = 5, loss 0.00671535
    ctx = errors_context([0.30], [0.45], reference=([0.31], [0.44]))
    ctx.outputs = SimpleNamespace(noised=SimpleNamespace(sigma=torch.tensor([0.5, 0.5])))
    assert get_method("flow-dpo")(beta=500).loss(ctx).loss.item() == pytest.approx(0.00671535, abs=1e-8)


def test_no_reference_and_independent_noise(tmp_path):
    trainer = tiny_diffusion_trainer("dso-dro", tmp_path, target="flow", rows=diffusion_rows(same=True), max_steps=2,
                                     training={"timestep_sampling": "logit_normal", "logit_mean": 1.0})  # fmt: skip
    assert trainer.reference_mode == "none" and trainer.ref_model is None
    noised = []
    original = trainer.scorer.forward_noise
    trainer.scorer.forward_noise = lambda *a, **k: noised.append(original(*a, **k)) or noised[-1]
    trainer.train()
    logs = training_logs(trainer)
    assert "mse/reference" not in logs[0] and "dro/loser_error" in logs[0]
    b = trainer.args.per_device_train_batch_size
    assert torch.equal(noised[0].t[:b], noised[0].t[b:]) and not torch.equal(noised[0].noise[:b], noised[0].noise[b:])
    assert logs[0]["loss"] != 0  # same images, independent ε: zero only in expectation
