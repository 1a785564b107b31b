"""SPO: the card's worked example (compare, loss, gradients), the compare function (best/worst of k, threshold),
log 2 with non-zero gradients at init, the branching sampler's pairs (shared x_t, winner first, kept only above the
threshold), errors, and a generation-side learning test on the tiny UNet."""

from __future__ import annotations

import math

import pytest
import torch
from trl_plus_spo import SPO, preference_compare, spo_losses

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
