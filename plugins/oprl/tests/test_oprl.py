"""OPRL: the card's worked example (r_φ, A^E, A^S, A, the two PRM-DPO losses), its properties (r_φ ≡ 0 and J_PRM =
log 2 at φ = θold, A^S invariant to β, advantages summing to 0), the turn-level ratio and surrogate, the PRM adapter
getting gradients only in its own step, a checkpoint restoring it, the generation-side reward rising on a two-turn
game, and the recipe validating."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from trl_plus_oprl import (
    OPRL,
    OPRLConfig,
    combined_advantages,
    episode_advantages,
    prm_loss,
    prm_pairs,
    step_advantages,
    step_rewards,
    turn_objective,
)

from trl_plus import GroupContext, Rollout, get_registry, turn_sums
from trl_plus.testing import tiny_group_trainer, training_logs

ROOT = Path(__file__).resolve().parents[3]
F64 = torch.float64

# The card (β 0.05, α 1, one task, N = 3; per-turn action log-prob sums; τ1, τ2 succeed, τ3 fails)
PRM = [[-10.0, -8.0, 0.0], [-12.0, -9.0, -7.0], [-15.0, 0.0, 0.0]]
OLD = [[-11.0, -8.5, 0.0], [-11.0, -9.0, -7.5], [-14.0, 0.0, 0.0]]
PRESENT = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
REWARDS = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
GROUP = torch.zeros(3, dtype=torch.long)


def card_tensors():
    prm, old = torch.tensor(PRM, dtype=F64), torch.tensor(OLD, dtype=F64)
    return prm, old, step_rewards(prm, old, 0.05) * PRESENT


def test_card_worked_example():
    prm, old, r = card_tensors()
    assert r[PRESENT].tolist() == pytest.approx([0.05, 0.025, -0.05, 0.0, 0.025, -0.05], abs=1e-12)
    a_episode = episode_advantages(REWARDS, GROUP)
    assert a_episode.tolist() == pytest.approx([0.577350, 0.577350, -1.154701], abs=1e-6)  # sample std
    a_step = step_advantages(r, PRESENT, GROUP)
    assert a_step[PRESENT].tolist() == pytest.approx([1.195229, 0.597614, -1.195229, 0.0, 0.597614, -1.195229],
                                                     abs=1e-6)  # fmt: skip
    a = combined_advantages(a_episode, a_step, PRESENT, 1.0)
    assert a[PRESENT].tolist() == pytest.approx([1.772579, 1.174965, -0.617878, 0.577350, 1.174965, -2.349929],
                                                abs=1e-6)  # fmt: skip
    assert (a[~PRESENT] == 0).all()
    pairs = prm_pairs(REWARDS, GROUP)
    assert pairs == [(0, 2), (1, 2)]  # every success against the failure
    trajectory = (prm * PRESENT).sum(-1), (old * PRESENT).sum(-1)
    assert prm_loss(*trajectory, [(0, 2)], 0.05).item() == pytest.approx(0.632599, abs=1e-6)
    assert prm_loss(*trajectory, [(1, 2)], 0.05).item() == pytest.approx(0.680725, abs=1e-6)
    assert prm_loss(*trajectory, pairs, 0.05).item() == pytest.approx((0.632599 + 0.680725) / 2, abs=1e-6)


def test_properties_at_initialisation_and_under_beta():
    prm, old, r = card_tensors()
    assert (step_rewards(old, old, 0.05) == 0).all()  # φ = θold: r_φ ≡ 0 ...
    assert (step_advantages(step_rewards(old, old, 0.05), PRESENT, GROUP) == 0).all()  # ... and A^S 0, not 0/0
    trajectory = (old * PRESENT).sum(-1)
    assert prm_loss(trajectory, trajectory, [(0, 2)], 0.05).item() == pytest.approx(math.log(2), abs=1e-12)
    scaled = step_rewards(prm, old, 0.5) * PRESENT  # β changes r_φ and J_PRM, not A^S
    assert torch.allclose(step_advantages(scaled, PRESENT, GROUP), step_advantages(r, PRESENT, GROUP), atol=1e-12)
    full = (prm * PRESENT).sum(-1), (old * PRESENT).sum(-1)
    assert prm_loss(*full, [(0, 2)], 0.5).item() != pytest.approx(prm_loss(*full, [(0, 2)], 0.05).item(), abs=1e-3)
    assert episode_advantages(REWARDS, GROUP).sum().item() == pytest.approx(0.0, abs=1e-12)
    assert step_advantages(r, PRESENT, GROUP)[PRESENT].mean().item() == pytest.approx(0.0, abs=1e-12)
    # the step rewards telescope: Σ_t r_φ(a_t) is the trajectory's DPO implicit reward
    assert torch.allclose(r.sum(-1), 0.05 * (full[0] - full[1]), atol=1e-12)
    # two tasks are normalised separately; α = 0 is the base algorithm's episode advantage
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    twice = episode_advantages(torch.cat([REWARDS, REWARDS * 3]), group)
    assert torch.allclose(twice[:3], twice[3:], atol=1e-12)
    zero = combined_advantages(episode_advantages(REWARDS, GROUP), step_advantages(r, PRESENT, GROUP), PRESENT, 0.0)
    assert torch.allclose(zero, episode_advantages(REWARDS, GROUP)[:, None] * PRESENT, atol=1e-12)


def test_pairs_margin_and_cap():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0], dtype=F64)
    group = torch.tensor([0, 0, 1, 1])
    assert prm_pairs(rewards, group) == [(0, 1), (2, 3)]
    assert prm_pairs(rewards, group, margin=1.5) == [(0, 1), (2, 3)]
    assert prm_pairs(rewards, group, margin=2.5) == []
    assert prm_pairs(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), cap=3) == [(0, 2), (0, 3),
                                                                                                     (1, 2)]  # fmt: skip


def test_turn_ratio_and_surrogate():
    """ρ_t multiplies the token ratios of turn t only; observations (turn −1) and padding count in no turn; every
    token of a turn carries the same advantage and the surrogate clips each turn."""
    turn_ids = torch.tensor([[0, 0, -1, -1, 1, 1, 1], [0, 0, 0, -1, -1, -1, -1]])
    mask = (turn_ids >= 0).double()
    old = torch.zeros(2, 7, dtype=F64)
    logps = torch.tensor([[0.1, 0.2, 5.0, 5.0, -0.1, 0.0, -0.2], [0.05, 0.05, 0.0, 9.0, 9.0, 9.0, 9.0]], dtype=F64)
    ctx = GroupContext(token_logps=logps, old_token_logps=old, mask=mask, advantages=torch.zeros(2, 7),
                       config=OPRLConfig(), rows_per_update=2, turn_ids=turn_ids)  # fmt: skip
    ratio = ctx.ratio("turn")
    expected = torch.tensor([[math.exp(0.3), math.exp(-0.3)], [math.exp(0.1), 1.0]], dtype=F64)
    assert torch.allclose(ratio, expected, atol=1e-12, rtol=0)
    counts, present = turn_sums(mask, turn_ids)
    assert counts.tolist() == [[2, 3], [3, 0]] and present.tolist() == [[True, True], [True, False]]
    advantages = torch.tensor([[1.0, -1.0], [2.0, 0.0]], dtype=F64)
    value = turn_objective(ratio, advantages, present, 0.2)
    expected_0 = (min(math.exp(0.3), 1.2) * 1.0 + max(math.exp(-0.3), 0.8) * -1.0) / 2
    assert value.tolist() == pytest.approx([expected_0, math.exp(0.1) * 2.0], abs=1e-12)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"])


TURNS = {"n": 4, "decoding": {"max_new_tokens": 6, "temperature": 1.0}}


def trainer(tmp_path, steps=2, **method_args):
    env = get_registry().get_environment("turns")({"max_turns": 2})
    return tiny_group_trainer("oprl", tmp_path, method_args={"prm_lr": 1e-2, **method_args}, max_steps=steps,
                              rollout=Rollout(**TURNS, environment=env), peft_config=lora())  # fmt: skip


def test_the_prm_adapter_gets_gradients_only_in_its_own_step(tmp_path, one_thread):
    """At each optimiser step, which adapters hold gradients: the PRM's own step sees only the PRM's, the policy's
    step only the policy's (a mixed graph would leave one of them without)."""
    from transformers import TrainerCallback

    t = trainer(tmp_path)
    model = t.model
    seen = []

    def with_grads() -> set[str]:
        return {n.split(".")[-2] for n, p in model.named_parameters()
                if (".default." in n or ".prm." in n) and p.grad is not None and p.grad.abs().sum() > 0}  # fmt: skip

    prm = t.trainable_adapters["prm"]
    step = prm.optimizer.step
    prm.optimizer.step = lambda *a, **k: (seen.append(("prm", with_grads())), step(*a, **k))[1]

    class Policy(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append(("policy", with_grads()))

    t.add_callback(Policy())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".prm." in n}
    t.train()
    assert seen == [("prm", {"prm"}), ("policy", {"default"})] * 2, seen
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".prm." in n)  # out of DDP, policy optim
    optimised = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for n, p in model.named_parameters() if ".prm." in n)
    moved = [n for n, p in model.named_parameters() if ".prm." in n and not torch.equal(p, before[n])]
    assert moved and prm.steps == 2  # one PRM step per generation batch
    logs = training_logs(t)
    assert all(e["prm/pairs"] > 0 for e in logs) and all("prm/loss" in e for e in logs)


def test_a_checkpoint_holds_the_prm_and_a_resume_restores_it(tmp_path, one_thread):
    t = trainer(tmp_path / "a")
    t.args.save_strategy, t.args.save_steps = "steps", 2
    t.train()
    folder = tmp_path / "a" / "checkpoint-2" / "trainable-prm"
    assert (folder / "adapter.safetensors").is_file() and (folder / "optimizer.pt").is_file()
    fresh = trainer(tmp_path / "b")
    fresh.trainable_adapters["prm"].load(str(tmp_path / "a" / "checkpoint-2"))
    trained = dict(t.model.named_parameters())
    for name, p in fresh.model.named_parameters():
        if ".prm." in name:
            assert torch.equal(p, trained[name]), name
    assert fresh.trainable_adapters["prm"].steps == 2
    resumed = trainer(tmp_path / "a", steps=3)  # the trainer's resume path restores the PRM, then steps it once
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == 3 and resumed.trainable_adapters["prm"].steps == 3


def test_without_lora_one_line_says_the_prm_needs_it(tmp_path):
    from trl_plus import TrlPlusError

    env = get_registry().get_environment("turns")()
    with pytest.raises(TrlPlusError, match=r"second adapter \('prm'\).*needs LoRA"):
        tiny_group_trainer("oprl", tmp_path, rollout=Rollout(**TURNS, environment=env))


def test_the_two_turn_games_reward_rises(tmp_path, one_thread):
    t = trainer(tmp_path, steps=20)
    t.train()
    curve = [e["rollout/reward"] for e in training_logs(t)]  # digits written over both turns, mean of 8 episodes
    first, last = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert last - first >= 1.9, curve  # measured 1.25 → 5.05 (1.125, 1.25, 1.375, ..., 5.875, 4.75, 5.125, 5): half


def test_the_recipe_validates(monkeypatch):
    from trl_plus import check_recipe, load_recipe

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/oprl.yaml").read_text())
    assert recipe["training"]["per_device_train_batch_size"] % recipe["rollout"]["n"] == 0
    assert recipe["rollout"]["environment"]["name"] == "turns"
    check_recipe(load_recipe("recipes/oprl.yaml"))
    assert OPRL.needs.reference == "no"
