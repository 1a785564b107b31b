"""ABC: the card's worked example and gradients, its test properties (ι ≥ 0 so L ≥ 2·log 2, equality at the margin,
the sign change of ∂L/∂s_neg at s_pos + δ, symmetry), and the trainer's four terms (one t and ε per triplet, y⁻
encoded once, no reference forward)."""

from __future__ import annotations

import math

import pytest
import torch
from trl_plus_abc import ABC, SUFFIX, abc_losses

from trl_plus import TrlPlusError
from trl_plus.testing import diffusion_batch, diffusion_loss, make_context, tiny_diffusion_trainer, training_logs


def errors_context(s):
    """A hand-made context whose four raw errors are ``s`` (ℓ = −½·ē, the trainer's default weight)."""
    return make_context([[[-0.5 * v] for v in row] for row in s])


def test_card_worked_example():
    # δ 0.025; s(x⁺,y⁺) 0.10, s(x⁻,y⁺) 0.11, s(x⁻,y⁻) 0.12, s(x⁺,y⁻) 0.115: ι₁ 0.010225, ι₂ 0.0153, L 1.39910
    ctx = errors_context([[0.10], [0.11], [0.12], [0.115]])
    out = ABC().loss(ctx)
    assert out.metrics["abc/iota_pos"].item() == pytest.approx(0.010225, abs=1e-9)
    assert out.metrics["abc/iota_neg"].item() == pytest.approx(0.0153, abs=1e-9)
    assert out.loss.item() == pytest.approx(1.39910, abs=5e-6)
    out.loss.backward()
    grad_s = -0.5 * ctx.token_logps.grad[:, 0, 0]  # ∂L/∂s = ∂L/∂ℓ · ∂ℓ/∂s, ℓ = −½·s
    assert grad_s[0].item() == pytest.approx(0.100511, abs=5e-7)  # through s_pos² only (margin anchor detached)
    assert grad_s[1].item() == pytest.approx(-0.0150767, abs=5e-8)


def test_bounded_below_by_two_log_two_reached_at_the_margin():
    generator = torch.Generator().manual_seed(0)
    s = torch.rand(4, 256, generator=generator, dtype=torch.float64) * 0.3
    losses, iota = abc_losses(s, 0.025)
    assert bool((iota >= 0).all()) and bool((losses >= 2 * math.log(2)).all())
    at_margin = torch.tensor([[0.0], [0.025], [0.0], [0.025]], dtype=torch.float64)
    assert abc_losses(at_margin, 0.025)[0].item() == pytest.approx(2 * math.log(2), abs=1e-12)


def test_the_negative_error_is_pulled_to_the_margin_not_pushed_up():
    for s_neg, sign in ((0.11, -1), (0.13, 1)):  # s_pos 0.1, δ 0.025: the sign of ∂L/∂s_neg changes at 0.125
        s = torch.tensor([[0.1], [s_neg], [0.1], [0.125]], dtype=torch.float64, requires_grad=True)
        abc_losses(s, 0.025)[0].sum().backward()
        assert math.copysign(1, s.grad[1].item()) == sign
        assert s.grad[3].item() == pytest.approx(0.0, abs=1e-15)  # exactly at the margin: no push


def test_symmetric_in_the_two_prompts():
    s = torch.tensor([[0.10], [0.11], [0.12], [0.115]], dtype=torch.float64)
    swapped = s[[2, 3, 0, 1]]  # (x⁺, y⁺) <-> (x⁻, y⁻)
    assert abc_losses(s, 0.025)[0].item() == abc_losses(swapped, 0.025)[0].item()


def test_without_stop_gradient_the_anchor_also_carries_gradient():
    s = torch.tensor([[0.10], [0.11], [0.12], [0.115]], dtype=torch.float64, requires_grad=True)
    abc_losses(s, 0.025, stop_gradient=False)[0].sum().backward()
    sigma = torch.sigmoid(torch.tensor(0.010225, dtype=torch.float64)).item()
    assert s.grad[0].item() == pytest.approx(sigma * (2 * 0.1 - 2 * (0.11 - 0.1 - 0.025)), abs=1e-12)


def test_trainer_scores_four_terms_on_one_draw_per_triplet_without_a_reference(tmp_path):
    trainer = tiny_diffusion_trainer("abc", tmp_path, batch_size=4, max_steps=3, learning_rate=1e-3)
    assert trainer.reference_mode == "none" and trainer.ref_model is None
    assert "prompt 0 " + SUFFIX in trainer._prompts  # y⁻ encoded once, into the text cache
    trainer.reference_errors = None  # a reference forward would fail
    batch = diffusion_batch(trainer, rows=4)
    assert batch["num_sequences"] == 4 and batch["negative_prompt_ids"].shape == (4,)
    score = trainer.score(trainer.model, batch, torch.Generator().manual_seed(0))
    assert score.ref_mse is None and score.mse.shape == (16,)
    noised = score.noised
    t, noise, x_t = noised.t.view(4, 4), noised.noise.view(4, 4, -1), noised.x_t.view(4, 4, -1)
    assert bool((t == t[:1]).all()) and bool((noise == noise[:1]).all())  # one (t, ε) per triplet
    x0 = batch["x0"].view(2, 4, -1)
    assert torch.equal(x_t[0], x_t[3]) and torch.equal(x_t[1], x_t[2])  # (x⁺,y⁺) / (x⁺,y⁻) share x_t
    assert not torch.equal(x0[0], x0[1])
    mse = score.mse.view(4, 4)
    assert not torch.equal(mse[0], mse[3])  # ... but are conditioned on different prompts
    loss = diffusion_loss(trainer, batch, seed=0).loss
    manual = abc_losses(mse, 0.025)[0].mean()
    assert loss.item() == pytest.approx(manual.item(), abs=1e-7)
    trainer.train()
    logs = training_logs(trainer)
    assert len(logs) == 3 and all(log["loss"] >= 2 * math.log(2) for log in logs) and "abc/accuracy" in logs[0]


def test_caption_dropout_is_refused(tmp_path):
    trainer = tiny_diffusion_trainer("abc", tmp_path, batch_size=2, training={"caption_dropout": 0.1})
    with pytest.raises(TrlPlusError, match="caption_dropout must be 0"):
        trainer.train()
