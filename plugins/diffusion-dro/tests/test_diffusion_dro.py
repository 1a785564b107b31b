"""Diffusion-DRO: the card's worked example, the hinge at init (m, non-zero gradient) and past the margin (zero), the
replay buffer (the stored ε̂ is the sampler's prediction at the stored latent, its size, (trajectory, step) draws),
the lagged sampler's refresh interval, invariance, one-line errors, and a generation-side learning test."""

from __future__ import annotations

import pytest
import torch
from trl_plus_diffusion_dro import DiffusionDRO, ReplayBuffer, hinge_loss

from trl_plus import LossContext, Rollout, TrlPlusError, get_registry
from trl_plus.testing import tiny_diffusion_trainer

FAST = Rollout(n=1, decoding={"steps": 4, "eta": 0.0, "guidance": 1.0})


def scorer(name: str, **args):
    cls = get_registry().get_scorer(name)
    return cls(cls.Config(**args))


def context(errors, ref_errors):
    """A loss context from ``[2, B]`` errors (row 0 expert, row 1 policy): ℓ = −½·e as the scorer gives it."""
    e = torch.tensor(errors, dtype=torch.float64).unsqueeze(-1).requires_grad_(True)
    r = torch.tensor(ref_errors, dtype=torch.float64).unsqueeze(-1)
    return LossContext(token_logps=-0.5 * e, mask=torch.ones_like(e), ref_token_logps=-0.5 * r), e


def trainer(tmp_path, expert=1.0, **kwargs):
    rows = [{"prompt": f"prompt {i}", "image": expert * torch.ones(4, 8, 8)} for i in range(4)]
    kwargs.setdefault("scorers", [(scorer("latent-mean"), 1.0)])
    return tiny_diffusion_trainer("diffusion-dro", tmp_path, rows=rows, rollout=FAST, **kwargs)


def test_card_worked_example():
    ctx, e = context([[0.20, 0.25], [0.30, 0.31]], [[0.21, 0.24], [0.30, 0.315]])
    out = DiffusionDRO().loss(ctx)
    assert out.loss.item() == pytest.approx(0.008, abs=1e-6)
    out.loss.backward()
    # example 1 is past the margin (diff = −0.01): no gradient; example 2 active: ∂L/∂e^E = +1/B, ∂L/∂e^π = −1/B
    assert e.grad.flatten().tolist() == pytest.approx([0.0, 0.5, 0.0, -0.5])


def test_at_init_the_loss_is_the_margin_with_a_gradient_and_past_the_margin_zero():
    same = [[0.3, 0.4], [0.5, 0.6]]
    ctx, e = context(same, same)
    out = DiffusionDRO().loss(ctx)
    assert out.loss.item() == pytest.approx(0.001, abs=1e-12)
    out.loss.backward()
    assert e.grad.abs().sum() > 0 and out.metrics["dro/active"].item() == 1.0
    ctx, e = context([[0.3 - 0.001, 0.4 - 0.002], [0.5, 0.6]], same)  # diff = −m and −2m
    out = DiffusionDRO().loss(ctx)
    out.loss.backward()
    assert out.loss.item() == 0.0 and e.grad.abs().sum().item() == 0.0


def test_invariant_to_a_constant_on_the_expert_errors_jointly():
    errors, ref = torch.tensor([[0.25, 0.3], [0.31, 0.2]]), torch.tensor([[0.24, 0.28], [0.315, 0.21]])
    base = hinge_loss(errors, ref, 0.001)[0]
    shift = torch.tensor([[0.7], [0.0]])
    assert hinge_loss(errors + shift, ref + shift, 0.001)[0].item() == pytest.approx(base.item(), abs=1e-6)


def test_the_buffer_keeps_its_size_and_draws_trajectory_steps():
    buffer = ReplayBuffer(3)
    for i in range(5):
        buffer.push(i, torch.zeros(1, 2), torch.full((4, 2), float(i)), torch.tensor([750, 500, 250, 0]),
                    torch.full((4, 2), 10.0 + i))  # fmt: skip
    assert len(buffer) == 3 and [item["prompt_id"] for item in buffer.items] == [2, 3, 4]
    rows = buffer.sample(2, torch.Generator().manual_seed(0))
    assert len({r["prompt_id"] for r in rows}) == 2  # without replacement when n <= size
    for row in rows:  # x_t and ε̂ of the same trajectory and step
        assert row["policy_eps"][0].item() - row["policy_x_t"][0].item() == 10.0
        assert row["timestep"] in (750, 500, 250, 0)
    assert len(buffer.sample(7, torch.Generator().manual_seed(0))) == 7  # with replacement beyond
    with pytest.raises(TrlPlusError, match="empty"):
        ReplayBuffer(2).sample(1)


def test_the_buffer_stores_the_samplers_prediction_at_the_latent_it_stores(tmp_path):
    """Policy == sampler (init): the replayed target ε̂ is the policy's own prediction at x_t^π, so e_θ^π = 0; the
    expert branch is a real forward-noised error; the run samples and trains through the core's online stage."""
    tr = trainer(tmp_path, max_steps=1, batch_size=2, method_args={"buffer_size": 2})
    method = tr.method
    seen, make_examples = [], method.make_examples
    method.make_examples = lambda rollouts: (seen.append(rollouts), make_examples(rollouts))[1]
    rows = tr.online_rows(list(tr.train_dataset[:2]))  # the core's stage: prompts 0 and 1 with their expert columns
    rollouts = seen[0]
    del method.make_examples
    assert len(rows) == 2 and len(method.buffer) == 2
    item = method.buffer.items[0]
    assert item["x_t"].shape == (4, 4, 8, 8) and item["timesteps"].tolist() == [750, 500, 250, 0]
    assert torch.equal(item["x_t"][0], rollouts.trajectory.latents[0, 0])  # x_T first, the last latent dropped
    batch = method.batch_collator()(rows)
    score = tr.score(tr.model, batch, torch.Generator().manual_seed(0))
    mse = score.mse.view(2, 2)
    assert mse[1].abs().max().item() < 1e-10 and mse[0].min().item() > 0.1
    assert torch.allclose(score.ref_mse.view(2, 2), mse.detach())  # reference == policy at init
    tr.train()
    assert tr.state.log_history[0]["loss"] == pytest.approx(0.001, abs=1e-6)  # diff = 0 at init: loss = m


def test_the_lagged_sampler_updates_exactly_every_buffer_update_steps(tmp_path, monkeypatch):
    tr = trainer(tmp_path, max_steps=5, batch_size=2, learning_rate=1e-3, method_args={"buffer_update_steps": 2})
    state = tr.parameter_state("sampler")
    initial = {k: v.clone() for k, v in state.tensors.items()}
    seen = []
    step_end = DiffusionDRO.step_end

    def record(self, trainer):
        step_end(self, trainer)
        name = state.names[0]
        seen.append((trainer.state.global_step, state.updates,
                     torch.equal(state.tensors[name], dict(trainer.policy().named_parameters())[name])))

    monkeypatch.setattr(DiffusionDRO, "step_end", record)
    tr.train()
    assert [s[:2] for s in seen] == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert [s[2] for s in seen] == [False, True, False, True, False]  # a copy of the policy right after each update
    assert not torch.equal(initial[state.names[0]], state.tensors[state.names[0]])


def test_the_replay_buffer_is_checkpointed_and_resumed(tmp_path):
    tr = trainer(tmp_path / "a", max_steps=2, batch_size=2, training={"save_strategy": "steps", "save_steps": 2})
    tr.train()
    saved = tr.method.buffer.items
    assert len(saved) == 4  # 2 steps x 2 prompts, within buffer_size 4
    resumed = trainer(tmp_path / "b", max_steps=2, batch_size=2)
    assert len(resumed.method.buffer) == 0
    resumed._load_from_checkpoint(str(tmp_path / "a" / "checkpoint-2"))
    restored = resumed.method.buffer.items
    assert [item["prompt_id"] for item in restored] == [item["prompt_id"] for item in saved]
    assert all(torch.equal(a["x_t"], b["x_t"]) and torch.equal(a["eps"], b["eps"]) for a, b in zip(saved, restored))


def test_bad_input_is_one_line(tmp_path):
    rows = [{"prompt": "p"}]
    tr = tiny_diffusion_trainer("diffusion-dro", tmp_path, rows=rows, rollout=FAST, max_steps=1, batch_size=1,
                                scorers=[(scorer("latent-mean"), 1.0)])  # fmt: skip
    with pytest.raises(TrlPlusError, match="'image'"):
        tr.train()
    with pytest.raises(TrlPlusError, match="reference"):
        DiffusionDRO().loss(LossContext(token_logps=-torch.ones(2, 1, 1), mask=torch.ones(2, 1, 1)))


def test_samples_move_toward_the_expert_images(tmp_path):
    """Generation side: dark expert latents (−1, the untrained model's samples average +1.25) and the reward −mean
    latent; fixed-seed samples' reward rises after 16 steps. m = 1 keeps the hinge active on this tiny model (with
    the official m = 0.001 every row is past the margin after a step or two and the run stops learning)."""
    tr = trainer(tmp_path, expert=-1.0, max_steps=16, batch_size=4, learning_rate=3e-3,
                 scorers=[(scorer("latent-mean"), -1.0)], method_args={"buffer_update_steps": 2, "margin": 1.0})
    before = tr.sample_reward(seed=0)
    tr.train()
    after = tr.sample_reward(seed=0)
    print(f"diffusion-dro sample reward {before:.4f} -> {after:.4f}")
    assert after > before + 0.05, (before, after)
