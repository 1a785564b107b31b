"""SPO: the card's worked example (compare, loss, gradients), the compare function (best/worst of k, threshold),
log 2 with non-zero gradients at init, the branching sampler's pairs (shared x_t, winner first, kept only above the
threshold), errors, and a generation-side learning test on the tiny UNet; GradSPO (variant gradspo): the card's
worked example through gradspo_scores, d → −d swaps winner and loser, g → 0 gives log 2 with no gradient, the scored
rows against a hand computation, the EMA (decay 0.9 after each optimizer step) samples, and a learning test."""

from __future__ import annotations

import math

import pytest
import torch
from trl_plus_spo import SPO, gradspo_scores, preference_compare, spo_losses

from trl_plus import ImageRollouts, LossContext, Rollout, TrlPlusError, get_registry, guided_prediction
from trl_plus.testing import official_ddim_logprob, perturb, tiny_diffusion_trainer

PROMPTS = [{"prompt": "a red square"}, {"prompt": "a blue circle"}]
SHORT = Rollout(n=1, decoding={"steps": 5, "eta": 1.0, "guidance": 5.0})


def trainer_for(tmp_path, weight=20.0, method_args=None, **kwargs):
    latent_mean = get_registry().get_scorer("latent-mean")
    return tiny_diffusion_trainer("spo", tmp_path, lora=True, rows=PROMPTS, rollout=SHORT,
                                  scorers=[(latent_mean(), weight)],
                                  method_args={"divert_start_step": 1, **(method_args or {})}, **kwargs)  # fmt: skip


def test_card_worked_example():
    indices, valid = preference_compare(torch.tensor([[21.0], [22.5], [20.2], [21.7]]), 0.3)
    assert indices.view(-1).tolist() == [1, 2] and valid.tolist() == [True]
    assert torch.tensor([22.5, 20.2]).softmax(0).tolist() == pytest.approx([0.908877, 0.091123], abs=1e-6)
    logps = torch.tensor([[-0.95], [-1.02]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.00], [-1.00]], dtype=torch.float64)
    ctx = LossContext(token_logps=logps.unsqueeze(-1), mask=torch.ones(2, 1, 1), ref_token_logps=ref.unsqueeze(-1))
    out = SPO().loss(ctx)
    assert out.loss.item() == pytest.approx(0.403186, abs=1e-6)
    out.loss.backward()
    assert logps.grad.view(-1).tolist() == pytest.approx([-3.31812, 3.31812], abs=1e-5)


def test_compare_best_worst_of_k_and_threshold():
    scores = torch.tensor([[0.0, 5.0, 1.0], [3.0, 1.0, 1.1], [1.0, 2.0, 1.2]])  # [k = 3, B = 3]
    indices, valid = preference_compare(scores, 0.3)
    assert indices.T.tolist() == [[1, 0], [0, 1], [2, 0]]
    # gaps tanh(Δ/2): 0.905 (kept), 0.964 (kept), 0.0997 (dropped); at threshold 0 all differing pairs are kept
    assert valid.tolist() == [True, True, False]
    assert preference_compare(scores, 0.0)[1].tolist() == [True, True, True]
    assert preference_compare(torch.ones(4, 2), 0.0)[1].tolist() == [False, False]  # all equal: no pair


def test_log_2_at_init_with_gradient():
    logps = torch.tensor([[-1.3, -0.7], [-0.9, -2.0]], dtype=torch.float64, requires_grad=True)
    losses, _ = spo_losses(logps, logps.detach().clone(), beta=10.0, eps=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-12)
    losses.sum().backward()
    assert logps.grad[0].tolist() == pytest.approx([-5.0, -5.0]) and logps.grad[1].tolist() == pytest.approx([5.0, 5.0])


def test_branching_sampler_pairs(tmp_path):
    trainer = trainer_for(tmp_path, method_args={"candidate_view": "latent"})
    ids = torch.tensor([trainer.prompt_id(p["prompt"]) for p in PROMPTS])
    rollouts = trainer.method.rollout(trainer, ids)
    assert rollouts.latents.shape == (2, 4, 8, 8) and rollouts.scores.shape == (2, 1)
    rows = trainer.method.make_examples(rollouts)
    assert rows, "no pair kept"
    assert trainer.sampling["steps"] == 5  # timesteps of the 5-step grid: 800, 600, 400, 200, 0
    for row in rows:
        pair = row["transition"]
        assert torch.equal(pair["x_t"][0], pair["x_t"][1])  # winner and loser share x_t
        assert pair["timestep"][0] == pair["timestep"][1] and int(pair["timestep"][0]) <= 600  # from step 1 on
        assert int(pair["prev_timestep"][0]) >= 0  # the σ = 0 last step gives no pair
        scores, weights, _, _ = trainer.score_images(["p", "p"], pair["x_prev"])
        reward = (scores * weights).sum(-1)
        gap = reward.softmax(0)
        assert gap[0] - gap[1] > 0.3  # the winner (first) scores higher, by more than the threshold
    batch = trainer.example_collator(rows)
    score = trainer.score(trainer.model, batch)
    assert score.logps.view(2, -1).detach() == pytest.approx(score.ref_logps.view(2, -1), abs=1e-6)  # init


def test_ratio_equals_the_official_formula_on_the_branching_samplers_pairs(tmp_path):
    # SPO's loss is D3PO's on its own pairs: the ratio of the trained transitions is the official
    # ddim_step_with_logprob density (written out) of the stored candidate, policy over reference, clipped
    trainer = trainer_for(tmp_path, method_args={"candidate_view": "latent"})
    perturb(trainer.model, seed=3, scale=0.02)  # policy (LoRA on) != reference (LoRA off)
    ids = torch.tensor([trainer.prompt_id(p["prompt"]) for p in PROMPTS])
    rows = trainer.method.make_examples(trainer.method.rollout(trainer, ids))
    assert rows, "no pair kept"
    batch = trainer.example_collator(rows)
    score = trainer.score(trainer.model, batch)
    k, b = 2, len(rows)
    _, log_ratios = spo_losses(score.logps.view(k, b), score.ref_logps.view(k, b), 10.0, 0.1)
    x_t, x_prev = batch["transition_x_t"], batch["transition_x_prev"]
    t, prev = batch["transition_timestep"], batch["transition_prev_timestep"]
    ids = batch["prompt_ids"][batch["group"]]
    cond, uncond = trainer.cond(ids), trainer.uncond(len(ids))

    def official_logp(model):
        with torch.no_grad():
            eps = guided_prediction(model, x_t, t, cond, uncond, 5.0).float()
        return official_ddim_logprob(trainer.bundle.scheduler, x_t, eps, x_prev, t, prev)

    policy = official_logp(trainer.policy())
    with torch.no_grad(), trainer.reference_denoiser() as reference:
        ref = official_logp(reference)
    official = torch.clamp(torch.exp(policy - ref), 1 - 0.1, 1 + 0.1).view(k, b)
    assert log_ratios.exp().detach() == pytest.approx(official, abs=1e-5)


def test_errors(tmp_path):
    trainer = trainer_for(tmp_path, method_args={"divert_start_step": 5})
    with pytest.raises(TrlPlusError, match="divert_start_step"):
        trainer.method.rollout(trainer, torch.tensor([1]))
    rollouts = ImageRollouts(prompts=["p"], prompt_ids=torch.tensor([1]), group=torch.tensor([0]),
                             latents=torch.zeros(1, 4, 2, 2), scores=torch.zeros(1, 1), weights=torch.ones(1))
    with pytest.raises(TrlPlusError, match="spo_pairs"):
        SPO().make_examples(rollouts)
    with pytest.raises(Exception, match="num_sample_each_step"):
        SPO(num_sample_each_step=1)


def test_sampled_reward_rises_after_training(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=8, learning_rate=1e-2)
    before = trainer.sample_reward(seed=0, n=4)
    trainer.train()
    after = trainer.sample_reward(seed=0, n=4)
    assert after > before + 0.5 * 20, (before / 20, after / 20)  # the latent mean (weight 20) rises by > 0.5


# -- GradSPO ------------------------------------------------------------------------------------------------------
CARD = {"eps": [0.10, -0.20, 0.30, 0.00], "ema": [0.12, -0.18, 0.28, 0.02], "n_max": [1, 0, -1, 0.5],
        "n_min": [-1, 0.5, 1, 0.5]}  # fmt: skip


def gradspo_loss(eps, ref_eps, ema, d, alpha, g, method=None):
    """The loss of GradSPO rows through gradspo_scores and SPO's loss: one pair per column of ``d`` ``[B, N]``."""
    direction = torch.cat([d, -d])  # winner rows +d, loser rows −d
    alphas = torch.full((direction.size(0),), alpha, dtype=eps.dtype)
    logps = gradspo_scores(eps.repeat(2, 1), ema.repeat(2, 1), direction, alphas, g)
    ref = gradspo_scores(ref_eps.repeat(2, 1), ema.repeat(2, 1), direction, alphas, g)
    ctx = LossContext(token_logps=logps.view(2, -1, 1), mask=torch.ones(2, d.size(0), 1),
                      ref_token_logps=ref.view(2, -1, 1))  # fmt: skip
    return (method or SPO(variant="gradspo")).loss(ctx).loss, logps


def test_gradspo_card_worked_example():
    eps = torch.tensor([CARD["eps"]], dtype=torch.float64, requires_grad=True)
    d = (torch.tensor([CARD["n_max"]], dtype=torch.float64) - torch.tensor([CARD["n_min"]], dtype=torch.float64)) / 2
    assert d.view(-1).tolist() == [1, -0.25, -1, 0]
    ema = torch.tensor([CARD["ema"]], dtype=torch.float64)
    loss, logps = gradspo_loss(eps, eps.detach().clone(), ema, d, alpha=0.5, g=0.5)
    assert logps.tolist() == pytest.approx([-0.0586659, -0.0710403], abs=1e-6)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    loss.backward()
    assert eps.grad.view(-1).tolist() == pytest.approx([1.76777, -0.441942, -1.76777, 0], abs=1e-5)
    assert eps.grad.view(-1).tolist() == pytest.approx((math.sqrt(0.5) * 2.5 * d).view(-1).tolist(), abs=1e-12)


def test_gradspo_direction_swap_and_zero_grad_scale():
    generator = torch.Generator().manual_seed(0)
    eps, ref, ema, d = (torch.randn(3, 16, generator=generator, dtype=torch.float64) for _ in range(4))
    eps = ref + 0.01 * eps  # policy != reference, the ratios inside the clip
    loss, logps = gradspo_loss(eps, ref, ema, d, alpha=0.3, g=0.5)
    swapped, swapped_logps = gradspo_loss(eps, ref, ema, -d, alpha=0.3, g=0.5)
    assert swapped_logps.view(2, -1).flip(0).flatten().tolist() == pytest.approx(logps.tolist(), abs=1e-12)
    _, ref_logps = gradspo_loss(ref, ref, ema, d, alpha=0.3, g=0.5)
    z = 10.0 * ((logps - ref_logps).view(2, -1)[0] - (logps - ref_logps).view(2, -1)[1])
    assert bool((z.abs() > 1e-3).all())  # a real signal to swap
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(z).mean().item(), abs=1e-12)
    assert swapped.item() == pytest.approx(-torch.nn.functional.logsigmoid(-z).mean().item(), abs=1e-12)
    eps = eps.clone().requires_grad_(True)
    flat, flat_logps = gradspo_loss(eps, ref, ema, d, alpha=0.3, g=0.0)
    assert flat.item() == pytest.approx(math.log(2), abs=1e-12)
    flat.backward()
    assert eps.grad.abs().max().item() == 0.0  # winner and loser identical: no signal


def gradspo_trainer(tmp_path, **kwargs):
    method_args = {"variant": "gradspo", "candidate_view": "latent", **kwargs.pop("method_args", {})}
    return trainer_for(tmp_path, method_args=method_args, **kwargs)


def perturb_trainable(model, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


def test_gradspo_rows_and_score_against_a_hand_computation(tmp_path):
    trainer = gradspo_trainer(tmp_path)
    ids = torch.tensor([trainer.prompt_id(p["prompt"]) for p in PROMPTS])
    rollouts = trainer.method.rollout(trainer, ids)
    rows = trainer.method.make_examples(rollouts)
    assert rows, "no pair kept"
    for row in rows:
        pair = row["transition"]
        assert torch.equal(pair["direction"][0], -pair["direction"][1])
        assert pair["direction"][0].abs().max() > 0
    ema = trainer.parameter_state("ema")  # created at the first rollout from the initial LoRA (= the reference)
    perturb_trainable(trainer.policy(), seed=3, scale=0.05)  # the policy leaves the EMA and the reference
    batch = trainer.example_collator(rows)
    score = trainer.score(trainer.model, batch)
    b = len(rows)
    assert score.logps.shape == (2 * b, 1) and score.ref_logps.shape == (2 * b, 1)
    x_t, t, direction = batch["transition_x_t"], batch["transition_timestep"], batch["transition_direction"]
    ids = batch["prompt_ids"][batch["group"]]
    cond, uncond = trainer.cond(ids), trainer.uncond(len(ids))
    with torch.no_grad():
        eps = guided_prediction(trainer.policy(), x_t, t, cond, uncond, 5.0)
        with trainer.reference_denoiser() as reference:  # the EMA's tensors are the initial LoRA's: ε_ema = ε_ref
            eps_ref = guided_prediction(reference, x_t, t, cond, uncond, 5.0)
    c = (1 - trainer.bundle.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    target = eps_ref - 0.5 * c * direction
    expected = -((eps - target) ** 2).flatten(1).mean(1)
    ref_expected = -((eps_ref - target) ** 2).flatten(1).mean(1)
    assert score.logps.view(-1).detach() == pytest.approx(expected, abs=1e-6)
    assert score.ref_logps.view(-1) == pytest.approx(ref_expected, abs=1e-6)
    assert not torch.allclose(score.logps.view(-1).detach(), score.ref_logps.view(-1))
    assert ema.updates == 0


def test_gradspo_ema_samples_and_is_updated_after_each_step(tmp_path):
    trainer = gradspo_trainer(tmp_path, max_steps=2, learning_rate=1e-2)
    ids = torch.tensor([trainer.prompt_id(p["prompt"]) for p in PROMPTS])
    ema = trainer.parameter_state("ema")
    perturb_trainable(trainer.policy(), seed=5, scale=0.05)  # policy != its EMA (still the initial LoRA)
    plain = SPO(divert_start_step=1, candidate_view="latent")
    policy_samples = plain.rollout(trainer, ids).latents
    with torch.no_grad(), ema.applied(trainer.policy()):
        ema_samples = plain.rollout(trainer, ids).latents
    gradspo_samples = trainer.method.rollout(trainer, ids).latents  # same generator seed: the same draws
    assert torch.allclose(gradspo_samples, ema_samples, atol=1e-6)
    assert not torch.allclose(gradspo_samples, policy_samples, atol=1e-3)
    assert torch.allclose(plain.rollout(trainer, ids).latents, policy_samples, atol=1e-6)  # policy restored
    checks = []
    step_end = trainer.method.step_end

    def spy(tr):
        before = {name: value.clone() for name, value in ema.tensors.items()}
        step_end(tr)
        params = dict(tr.policy().named_parameters())
        checks.append(max((ema.tensors[n] - (0.9 * before[n] + 0.1 * params[n].detach())).abs().max().item()
                          for n in ema.names))  # fmt: skip

    trainer.method.step_end = spy
    trainer.train()
    assert len(checks) == 2 and ema.updates == 2 and max(checks) < 1e-6


def test_gradspo_sampled_reward_rises_after_training(tmp_path):
    trainer = gradspo_trainer(tmp_path, max_steps=8, learning_rate=1e-2, method_args={"candidate_view": "predicted_x0"})
    before = trainer.sample_reward(seed=0, n=4)
    trainer.train()
    after = trainer.sample_reward(seed=0, n=4)
    assert after > before + 0.5 * 20, (before / 20, after / 20)
    # control: g = 0 makes winner and loser identical, so the same training leaves the samples as they were
    control = gradspo_trainer(tmp_path / "g0", max_steps=2, learning_rate=1e-2,
                              method_args={"candidate_view": "predicted_x0", "grad_scale": 0.0})  # fmt: skip
    untouched = control.sample_reward(seed=0, n=4)
    control.train()
    assert untouched == pytest.approx(before)
    assert control.sample_reward(seed=0, n=4) == pytest.approx(untouched, abs=1e-6)
