"""Inversion-DPO: the card's worked example, the weights, the official zero gradient at θ = θ_ref (exact), the
determinism (no random t or ε), winner/loser swap z -> −z, and the way out (a policy that left the reference)."""

from __future__ import annotations

import math

import pytest
import torch
from trl_plus_inversion_dpo import InversionDPO, path_distance, path_weights

from trl_plus import ddim_invert
from trl_plus.testing import diffusion_batch, diffusion_loss, make_context, perturb, tiny_diffusion_trainer

ARGS = {"inversion_steps": 3}


def test_card_worked_example():
    alpha = torch.tensor([0.9, 0.5], dtype=torch.float64)
    assert path_weights(alpha).tolist() == pytest.approx([0.555556, 1.0], abs=5e-7)
    d_w = torch.tensor([1.0e-4, 2.0e-4], dtype=torch.float64)
    d_l = torch.tensor([1.5e-4, 0.5e-4], dtype=torch.float64)
    s_w, s_l = path_distance(d_w, alpha), path_distance(d_l, alpha)
    assert (s_w - s_l).item() == pytest.approx(6.11111e-5, abs=5e-11)
    out = InversionDPO(beta=2000).loss(make_context([[[-s_w.item()]], [[-s_l.item()]]]))
    assert out.loss.item() == pytest.approx(0.663058, abs=5e-7)
    assert (0.5 * 2000 * (s_w - s_l)).item() == pytest.approx(0.0611111, abs=5e-8)


def test_weights_grow_toward_high_noise():
    alpha = torch.linspace(0.99, 0.01, 20, dtype=torch.float64)
    assert bool((path_weights(alpha).diff() > 0).all())


def test_swapping_winner_and_loser_negates_z():
    a = InversionDPO().loss(make_context([[[-3e-4]], [[-1e-4]]]))
    b = InversionDPO().loss(make_context([[[-1e-4]], [[-3e-4]]]))
    z = 0.5 * 2000 * 2e-4
    assert a.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), abs=1e-12)
    assert b.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(z))), abs=1e-12)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return tiny_diffusion_trainer("inversion-dpo", tmp_path_factory.mktemp("inv"), batch_size=2, method_args=ARGS)


def test_at_init_log2_and_exactly_zero_gradient_and_deterministic(trainer):
    batch = diffusion_batch(trainer, rows=2)
    trainer.model.zero_grad()
    out = diffusion_loss(trainer, batch, seed=0)
    assert bool((trainer.score(trainer.model, batch).mse == 0).all())  # every ē_k is exactly 0
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)  # log 2 in fp32
    out.loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert all(g is None or bool((g == 0).all()) for g in grads)  # the official stationary point
    again = diffusion_loss(trainer, batch, seed=123).loss  # no random t or ε: the seed does not matter
    assert again.item() == out.loss.item()


def test_the_path_is_the_references_inversion_and_a_moved_policy_learns(tmp_path):
    trainer = tiny_diffusion_trainer("inversion-dpo", tmp_path, batch_size=2, method_args=ARGS)
    perturb(trainer.model, seed=1, scale=0.02)  # the policy leaves its frozen-copy reference
    batch = diffusion_batch(trainer, rows=2)
    score = trainer.score(trainer.model, batch)
    assert score.mse.shape == (4,) and bool((score.mse > 0).all())
    x0 = batch["x0"]
    cond = trainer.conditioning(batch["prompt_ids"], batch["group"], torch.float32, x0.device)
    uncond = trainer.conditioning(torch.zeros_like(batch["prompt_ids"]), batch["group"], torch.float32, x0.device)
    alpha0 = float(trainer.scorer.scheduler.alphas_cumprod[0])
    by_reference = ddim_invert(trainer.ref_model, x0, cond, trainer.scorer.scheduler, 3, guidance_scale=2.0,
                               uncond=uncond, alpha_start=alpha0).latent  # fmt: skip
    assert torch.equal(score.noised.x_t, by_reference)
    out = diffusion_loss(trainer, batch)
    out.loss.backward()
    assert abs(out.loss.item() - math.log(2)) > 1e-9
    assert any(p.grad is not None and bool((p.grad != 0).any()) for p in trainer.model.parameters())


def test_start_perturb_leaves_the_stationary_point(tmp_path):
    trainer = tiny_diffusion_trainer("inversion-dpo", tmp_path, batch_size=2, max_steps=2, learning_rate=1e-3,
                                     method_args={**ARGS, "start": "perturb", "start_noise": 1e-2})  # fmt: skip
    trainer.train()
    assert trainer.method._perturbed
