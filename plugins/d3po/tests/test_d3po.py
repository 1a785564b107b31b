"""D3PO: the card's worked example and gradients, log 2 at policy == reference (zero gradient with tie labels), swap
invariance, the official compare(), the rows make_examples builds, the clipped ratio against the official
ddim_step_with_logprob formula on sampled steps, errors, and a generation-side learning test on the tiny UNet."""

from __future__ import annotations

import math

import pytest
import torch
from trl_plus_d3po import D3PO, d3po_losses, preference

from trl_plus import ImageRollouts, LossContext, Rollout, Trajectory, TrlPlusError, get_registry, guided_prediction
from trl_plus.testing import official_ddim_logprob, perturb, tiny_diffusion_trainer

SHORT = Rollout(n=2, decoding={"steps": 4, "eta": 1.0, "guidance": 5.0})
PROMPTS = [{"prompt": "a red square"}, {"prompt": "a blue circle"}]


def trainer_for(tmp_path, **kwargs):
    latent_mean = get_registry().get_scorer("latent-mean")
    kwargs.setdefault("rollout", SHORT)
    return tiny_diffusion_trainer("d3po", tmp_path, lora=True, rows=PROMPTS, scorers=[(latent_mean(), 1.0)],
                                  **kwargs)  # fmt: skip


def context(logps, ref_logps):
    policy = torch.tensor(logps, dtype=torch.float64).view(2, -1, 1).requires_grad_(True)
    ref = torch.tensor(ref_logps, dtype=torch.float64).view(2, -1, 1)
    return LossContext(token_logps=policy, mask=torch.ones_like(policy), ref_token_logps=ref), policy


def test_card_worked_example():
    # rewards 5.2 / 6.0 -> h = (−1, +1); image 0: −1.20 / −1.25 (inside the clip), image 1: −1.10 / −1.40 (clipped)
    assert preference([5.2], [6.0]) == (-1, 1)
    logps = torch.tensor([[-1.20], [-1.10]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.25], [-1.40]], dtype=torch.float64)
    losses, log_ratios = d3po_losses(logps, ref, (-1, 1), beta=0.1, eps=0.1)
    assert log_ratios.view(-1).tolist() == pytest.approx([0.05, math.log(1.1)], abs=1e-12)
    assert losses.item() == pytest.approx(0.690884, abs=1e-6)
    losses.sum().backward()
    assert logps.grad.view(-1).tolist() == pytest.approx([0.0498867, 0.0], abs=1e-7)
    # the method's loss: the winner (image 1) first, the same value and gradients
    ctx, policy = context([-1.10, -1.20], [-1.40, -1.25])
    out = D3PO().loss(ctx)
    assert out.loss.item() == pytest.approx(0.690884, abs=1e-6)
    out.loss.backward()
    assert policy.grad.view(-1).tolist() == pytest.approx([0.0, 0.0498867], abs=1e-7)


@pytest.mark.parametrize("signs", [(1, -1), (-1, 1), (0, 0)])
def test_log_2_at_init_and_no_gradient_for_ties(signs):
    logps = torch.tensor([[-1.3, -0.7], [-0.9, -2.0]], dtype=torch.float64, requires_grad=True)
    losses, _ = d3po_losses(logps, logps.detach().clone(), signs, beta=0.1, eps=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-12)
    losses.sum().backward()
    if signs == (0, 0):
        assert bool((logps.grad == 0).all())
    else:  # the clip is inactive at ratio 1: the winner is pushed up, the loser down
        assert bool((logps.grad[signs.index(1)] < 0).all()) and bool((logps.grad[signs.index(-1)] > 0).all())


def test_swap_invariance_and_clipped_zero_gradient():
    logps = torch.tensor([[-1.0, -0.5], [-1.2, -0.4]], dtype=torch.float64)
    ref = torch.tensor([[-1.04, -0.3], [-1.1, -0.45]], dtype=torch.float64)
    h = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    forward, _ = d3po_losses(logps, ref, h, 0.1, 0.1)
    swapped, _ = d3po_losses(logps.flip(0), ref.flip(0), h.flip(0), 0.1, 0.1)
    assert swapped.tolist() == pytest.approx(forward.tolist(), abs=1e-15)
    far = torch.tensor([[0.5], [-3.0]], dtype=torch.float64, requires_grad=True)  # both ratios far outside the clip
    d3po_losses(far, torch.zeros(2, 1, dtype=torch.float64), (1, -1), 0.1, 0.1)[0].sum().backward()
    assert far.grad.abs().max().item() == 0.0 and torch.isfinite(far.grad).all()


def test_compare_is_pareto_dominance():
    assert preference([1.0, 2.0], [1.0, 3.0]) == (-1, 1)
    assert preference([2.0, 3.0], [1.0, 3.0]) == (1, -1)
    assert preference([1.0, 3.0], [2.0, 2.0]) == (0, 0)  # neither dominates
    assert preference([0.5], [0.5]) == (0, 0)


def test_make_examples_pairs_every_step_winner_first():
    steps, n = 3, 3
    latents = torch.randn(steps + 1, n, 4, 2, 2)
    trajectory = Trajectory(latents=latents, timesteps=torch.tensor([750, 500, 250]),
                            prev_timesteps=torch.tensor([500, 250, 0]), predictions=torch.zeros_like(latents[1:]),
                            logps=torch.zeros(steps, n), eta=1.0, guidance=1.0, stds=torch.full((steps,), 0.5))
    group = torch.zeros(n, dtype=torch.long)
    rollouts = ImageRollouts(prompts=["p"] * n, prompt_ids=torch.tensor([5] * n), group=group,
                             latents=latents[-1], scores=torch.tensor([[0.2], [0.9], [0.2]], dtype=torch.float64),
                             weights=torch.tensor([1.0], dtype=torch.float64), trajectory=trajectory)  # fmt: skip
    rows = D3PO().make_examples(rollouts)
    assert len(rows) == 2 * steps  # pairs (0,1) and (1,2); (0,2) is a tie and dropped
    first = rows[0]["transition"]
    assert rows[0]["prompt_id"] == 5
    assert torch.equal(first["x_t"][0], latents[0, 1]) and torch.equal(first["x_prev"][1], latents[1, 0])
    assert first["timestep"].tolist() == [750, 750] and first["prev_timestep"].tolist() == [500, 500]
    half = D3PO(timestep_fraction=0.5).make_examples(rollouts)  # int(3 · 0.5) = 1 step per pair
    assert len(half) == 2
    trajectory.stds[-1] = 0.0  # a deterministic last step (σ = 0) has no density: left out
    assert len(D3PO().make_examples(rollouts)) == 2 * (steps - 1)
    negative = ImageRollouts(prompts=["p"] * n, prompt_ids=torch.tensor([5] * n), group=group,
                             latents=latents[-1], scores=rollouts.scores, weights=-rollouts.weights,
                             trajectory=trajectory)  # fmt: skip
    assert torch.equal(D3PO().make_examples(negative)[0]["transition"]["x_t"][0], latents[0, 0])  # lower wins


def test_ratio_equals_the_official_formula_on_sampled_steps(tmp_path):
    trainer = trainer_for(tmp_path)
    perturb(trainer.model, seed=3, scale=0.02)  # policy (LoRA on) != reference (LoRA off)
    rollouts = trainer.sample_rollouts(torch.tensor([trainer.prompt_id("a red square")] * 2))
    assert torch.equal(rollouts.trajectory.latents[0, 0], rollouts.trajectory.latents[0, 1])  # shared x_T
    rows = trainer.method.make_examples(rollouts)
    assert rows
    batch = trainer.example_collator(rows)
    score = trainer.score(trainer.model, batch)
    k, b = 2, len(rows)
    _, log_ratios = d3po_losses(score.logps.view(k, b), score.ref_logps.view(k, b), (1, -1), 0.1, 0.1)

    # ddim_step_with_logprob (d3po_pytorch/diffusers_patch), written out, on the same guided ε̂ of each model
    scheduler = trainer.bundle.scheduler
    x_t, x_prev = batch["transition_x_t"], batch["transition_x_prev"]
    t, prev = batch["transition_timestep"], batch["transition_prev_timestep"]
    assert bool((prev == t - scheduler.config.num_train_timesteps // 4).all())
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
    assert 0 < int(((official == 0.9) | (official == 1.1)).sum()) < official.numel()  # clipped and unclipped steps
    # the recorded step densities of the sampling policy are the ones the loss scores
    recorded = torch.stack([rollouts.trajectory.logps[j] for j in range(3)])  # the 4th (σ = 0) is skipped
    assert recorded.flatten().sort().values == pytest.approx(score.logps.detach().flatten().sort().values, abs=1e-4)


def test_errors(tmp_path):
    rollouts = ImageRollouts(prompts=["p"], prompt_ids=torch.tensor([1]), group=torch.tensor([0]),
                             latents=torch.zeros(1, 4, 2, 2), scores=torch.zeros(1, 1), weights=torch.ones(1))
    with pytest.raises(TrlPlusError, match="record = True"):
        D3PO().make_examples(rollouts)
    ctx, _ = context([-1.0, -1.0], [-1.0, -1.0])
    ctx.ref_token_logps = None
    with pytest.raises(TrlPlusError, match="reference.mode"):
        D3PO().loss(ctx)
    with pytest.raises(Exception, match="eps"):
        D3PO(eps=1.5)


def test_sampled_reward_rises_after_training(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=8, learning_rate=1e-2)
    before = trainer.sample_reward(seed=0, n=4)
    trainer.train()
    after = trainer.sample_reward(seed=0, n=4)
    assert after > before + 0.5, (before, after)
