"""Diff-UAPA: the card's worked example, log 2 and ϕ = 0.5 at init (through the trainer's scorer), α = β = 0 is
Diff-CPL, k = 0 is diffusion-dpo with β = αI on the same draws, step t of both segments shares its draw, the prior's
gradient pulls ϕ toward the Beta mode, discounting, the data checks, and preference rounds as phases (each phase
continues the previous policy against the initial reference)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trl_plus_diff_uapa import DiffUAPA, segment_scores, uapa_losses

from trl_plus import DiffusionTrainer, LossContext, TrlPlusError, load_recipe, train
from trl_plus.testing import checked_split, diffusion_batch, diffusion_loss, perturb, tiny_diffusion_trainer

BETAS = {"alpha_w": 3.0, "beta_w": 1.0, "alpha_l": 1.0, "beta_l": 3.0}


def context(d_w, d_l, betas=BETAS):
    d = torch.tensor([*d_w, *d_l], dtype=torch.float64).view(-1, 1, 1)
    batch = {k: torch.tensor([v], dtype=torch.float64) for k, v in betas.items()}
    return LossContext(token_logps=-d, mask=torch.ones_like(d), ref_token_logps=torch.zeros_like(d), batch=batch)


def test_card_worked_example():
    out = DiffUAPA(scale=10.0, gamma=0.99).loss(context([-0.01, -0.02], [0.01, 0.00]))
    d = torch.tensor([[-0.01, -0.02], [0.01, 0.00]], dtype=torch.float64).T.unsqueeze(-1)  # [S, 2, 1]
    assert segment_scores(d, 0.99).view(-1).tolist() == pytest.approx([-0.0298, 0.01], abs=1e-12)
    params = [torch.tensor([v], dtype=torch.float64) for v in BETAS.values()]
    total, mle, prior_w, prior_l, phi_w, phi_l = uapa_losses(d[:, 0], d[:, 1], params, 10.0, 0.99)
    assert mle.item() == pytest.approx(0.513818, abs=1e-6)
    assert (phi_w.item(), phi_l.item()) == pytest.approx((0.549586, 0.450414), abs=1e-6)
    assert (prior_w.item(), prior_l.item()) == pytest.approx((-0.402376, -0.402376), abs=1e-6)
    assert out.loss.item() == pytest.approx(-0.290933, abs=1e-6) == total.item()


def test_alpha_beta_zero_is_diff_cpl():
    zeros = dict.fromkeys(BETAS, 0.0)
    g = torch.Generator().manual_seed(0)
    d_w, d_l = torch.randn(3, generator=g).tolist(), torch.randn(3, generator=g).tolist()
    with_prior = DiffUAPA().loss(context(d_w, d_l, zeros))
    cpl = DiffUAPA(prior=False).loss(context(d_w, d_l, BETAS))
    assert with_prior.metrics["uapa/prior"].item() == 0.0
    assert with_prior.loss.item() == pytest.approx(cpl.loss.item(), abs=1e-12)


def test_discount_reweights_later_steps_only():
    d = torch.tensor([[0.5], [0.2], [-0.1]])
    assert segment_scores(d, 1.0).item() == pytest.approx(0.6)
    assert segment_scores(d, 0.5).item() == pytest.approx(0.5 + 0.1 - 0.025)
    assert segment_scores(d[:1], 0.5).item() == segment_scores(d[:1], 1.0).item()  # the first step's weight is 1


@pytest.mark.parametrize("alpha, beta, phi0", [(3.0, 1.0, 0.5), (1.0, 3.0, 0.5), (3.0, 1.0, 0.9), (2.0, 2.0, 0.2)])
def test_prior_gradient_pulls_phi_toward_the_mode(alpha, beta, phi0):
    mode = alpha / (alpha + beta)
    big = torch.tensor([-math.log(phi0 / (1 - phi0)) / 10.0, 0.0], dtype=torch.float64)  # D̄-relative: ϕ_w = phi0
    d_w = (big[:1] + 0.0).view(1, 1).requires_grad_(True)  # winner D, and a loser whose D mirrors it (D̄ = 0)
    d_l = (-d_w).detach().requires_grad_(False)
    params = [torch.tensor([v], dtype=torch.float64) for v in (alpha, beta, 1.0, 1.0)]
    _, _, prior_w, _, phi_w, _ = uapa_losses(d_w, d_l, params, 10.0, 1.0)
    assert phi_w.item() == pytest.approx(phi0, abs=1e-9)
    (grad,) = torch.autograd.grad(prior_w.sum(), d_w)
    stepped = d_w.detach() - 1e-3 * grad
    after = uapa_losses(stepped, d_l, params, 10.0, 1.0)[4].item()
    assert abs(after - mode) < abs(phi0 - mode)


def rows(k1, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": f"p{i % 2}", "x0": torch.randn(2 * k1, 4, 8, 8, generator=g), **BETAS} for i in range(n)]


def test_init_log2_and_half_through_the_scorer(tmp_path):
    trainer = tiny_diffusion_trainer(DiffUAPA, tmp_path, rows=rows(2), batch_size=4)
    out = diffusion_loss(trainer, diffusion_batch(trainer), seed=1)
    assert out.metrics["uapa/mle"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["uapa/phi_chosen"].item() == pytest.approx(0.5, abs=1e-7)
    expected = -(math.log(0.5) * 3 + math.log(0.5) * 1 - math.lgamma(4) - math.lgamma(2) + math.lgamma(6))
    assert out.metrics["uapa/prior"].item() == pytest.approx(2 * expected, abs=1e-5)  # both: Beta(0.5; 4, 2)


def test_step_t_of_both_segments_shares_its_draw(tmp_path):
    trainer = tiny_diffusion_trainer(DiffUAPA, tmp_path, rows=rows(3, n=2), batch_size=2)
    score = trainer.score(trainer.model, diffusion_batch(trainer), torch.Generator().manual_seed(0))
    t = score.noised.timesteps.view(6, 2)  # [K = 2(k+1), B]
    noise = score.noised.noise.view(6, 2, -1)
    assert torch.equal(t[:3], t[3:]) and torch.equal(noise[:3], noise[3:])
    assert not torch.equal(noise[0], noise[1])


def test_k0_is_diffusion_dpo_with_beta_scale(tmp_path):
    data = [{**r, **dict.fromkeys(BETAS, 0.0)} for r in rows(1)]
    uapa = tiny_diffusion_trainer(DiffUAPA, tmp_path / "u", rows=data, batch_size=4,
                                  method_args={"scale": 700.0, "gamma": 0.9})  # fmt: skip
    dpo = tiny_diffusion_trainer("diffusion-dpo", tmp_path / "d", rows=data, batch_size=4, method_args={"beta": 700.0})
    for trainer in (uapa, dpo):
        perturb(trainer.model, seed=1, scale=0.02)
    ours = diffusion_loss(uapa, diffusion_batch(uapa), seed=2).loss.item()
    theirs = diffusion_loss(dpo, diffusion_batch(dpo), seed=2).loss.item()
    assert abs(ours - math.log(2)) > 1e-3  # off its initial value
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_data_checks(tmp_path):
    recipe = load_recipe("recipes/diff-uapa.yaml", ["model.name_or_path=tiny-sd", "model.lora=null",
                                                    f"training.output_dir={tmp_path}"])  # fmt: skip
    assert len(checked_split(recipe.model_copy(update={"phases": None}))) == 4
    image = str(Path("recipes/data/diffusion/red-0-a.png").resolve())

    def check(row):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "a", "chosen": [image], "rejected": [image], **BETAS, **row}) + "\n")
        data = recipe.data.model_copy(update={"train": recipe.data.train.model_copy(update={"path": str(bad)})})
        checked_split(recipe.model_copy(update={"phases": None, "data": data}))

    with pytest.raises(TrlPlusError, match="'rejected' has 2 values but 'chosen' has 1"):
        check({"rejected": [image, image]})
    with pytest.raises(TrlPlusError, match="row 1: beta_l must be a number ≥ 0"):
        check({"beta_l": -1.0})
    with pytest.raises(TrlPlusError, match="alpha_w"):
        check({"alpha_w": None})


def test_rounds_as_phases_continue_the_policy(tmp_path, monkeypatch):
    seen = []
    original = DiffusionTrainer.from_recipe.__func__

    def spy(cls, recipe, method, training, *args, **kwargs):
        trainer = original(cls, recipe, method, training, *args, **kwargs)
        seen.append((kwargs.get("model"), trainer))
        return trainer

    monkeypatch.setattr(DiffusionTrainer, "from_recipe", classmethod(spy))
    result = train("recipes/diff-uapa.yaml", [
        "model.name_or_path=tiny-sd", "model.lora=null", "model.resolution=16", "training.max_steps=2",
        "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1", "training.logging_steps=1",
        "training.learning_rate=1e-3", f"training.output_dir={tmp_path}", "data.report=false",
        "phases.sequence=[{name: round1}, {name: round2}]"])  # fmt: skip
    assert result.global_step == 4 and len(seen) == 2
    first, second = seen[0][1], seen[1][1]
    assert seen[0][0] is None and seen[1][0] is first.accelerator.unwrap_model(first.model)
    base = dict(first.ref_model.named_parameters())
    moved = [n for n, p in second.ref_model.named_parameters() if not torch.equal(p, base[n])]
    assert not moved  # round 2's reference is the initial policy, not round 1's result
    assert any(not torch.equal(p, base[n]) for n, p in second.model.named_parameters())
