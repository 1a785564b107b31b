"""Group RL on TRL's GRPOTrainer (``trl_plus.trainers.group``): the builtin ``grpo`` learns on the generation-side
reward, a method's advantages see the gathered batch (raw scores, groups, baseline) and may be per token ``[N, T]``
(TRL's tolerated path, pinned here), a method's loss sees old log-probs that differ from the current ones only after
the first update of a generation batch, ``beta > 0`` works for a model built in memory, runs are reproducible, and
bad batch arithmetic or scorers are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from trl_plus import GRPO, GroupMethod, LossOutput, Paper, Rollout, Scorer, TrlPlusError, get_registry
from trl_plus.testing import launch, tiny_group_trainer, tiny_recipe

PROMPTS = [{"prompt": f"Count to {i}:"} for i in range(32)]
FAST = Rollout(n=4, decoding={"max_new_tokens": 12, "temperature": 1.0})


def digits():
    cls = get_registry().get_scorer("digits")
    return cls(cls.Config())


def group_trainer(tmp_path, method=GRPO, steps=4, rollout=FAST, scorers=None, model=None, **training):
    return tiny_group_trainer(method, tmp_path, rows=PROMPTS, scorers=scorers, rollout=rollout, max_steps=steps,
                              model=model, training=training)  # fmt: skip


def curve(trainer) -> list[float]:
    return [e["rollout/reward"] for e in trainer.state.log_history if "rollout/reward" in e]


def test_grpo_raises_the_generation_side_reward(tmp_path):
    trainer = group_trainer(tmp_path, steps=20, rollout=Rollout(n=4, decoding={"max_new_tokens": 16,
                                                                                  "temperature": 1.0}))  # fmt: skip
    trainer.train()
    rewards = curve(trainer)
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last - first > 4.5, rewards  # measured 2.1 -> 12.9 (mean of 4: 1.8 -> 12.6); half of that rise at least


class Recorder(GroupMethod):
    """Records what advantages() saw; returns TRL's baseline, or +1 per digit token (per-token advantages)."""

    name = "group-recorder-test"
    paper = Paper("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300")
    per_token = False
    seen: list = []

    def advantages(self, rollouts, baseline):
        type(self).seen.append((rollouts, baseline))
        if not self.per_token:
            return baseline
        width = max(len(c) for c in rollouts.completion_ids)
        out = torch.zeros(len(rollouts.completion_ids), width, dtype=torch.float64)
        for i, ids in enumerate(rollouts.completion_ids):
            for t, token in enumerate(ids):
                out[i, t] = 1.0 if type(self).decode(token).isdigit() else -0.1
        return out

    decode = None  # token id -> text, set by the test


def test_advantages_see_the_gathered_batch_with_raw_scores_and_trls_baseline(tmp_path):
    Recorder.seen, Recorder.per_token = [], False
    trainer = group_trainer(tmp_path, method=Recorder, steps=2, scorers=[(digits(), 2.0)])
    trainer.train()
    rollouts, baseline = Recorder.seen[0]
    n = 4
    assert len(rollouts.completion_ids) == 8 and rollouts.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert rollouts.score_names == ("digits",) and rollouts.weights.tolist() == [2.0]
    counts = [float(sum(ch.isdigit() for ch in text)) for text in rollouts.completions]
    assert rollouts.scores[:, 0].tolist() == counts  # the raw scores, before weights
    reward = rollouts.reward().view(-1, n)  # TRL's default: (r − group mean) / (group std + 1e-4)
    expected = (reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(baseline, expected.reshape(-1), rtol=1e-5, atol=1e-5)  # float32 in TRL
    assert all(rollouts.prompts[g * n] == rollouts.prompts[g * n + n - 1] for g in range(2))


def test_per_token_advantages_reach_trls_loss_and_the_policy_learns_them(tmp_path, monkeypatch):
    """TRL's loss takes (B, T) advantages "to support subclasses" (not a promised API): pin that it does."""
    from trl import GRPOTrainer

    Recorder.seen, Recorder.per_token = [], True
    trainer = group_trainer(tmp_path, method=Recorder, steps=12)
    tokenizer = trainer.processing_class
    Recorder.decode = staticmethod(lambda token: tokenizer.decode([token]))
    shapes = []
    original = GRPOTrainer._compute_loss

    def spy(self, model, inputs):
        shapes.append((tuple(inputs["advantages"].shape), tuple(inputs["completion_ids"].shape)))
        return original(self, model, inputs)

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", spy)
    trainer.train()
    assert all(adv == ids for adv, ids in shapes), shapes  # [M, T] per micro-batch, T = the completions' width
    rewards = curve(trainer)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 2.0, rewards  # +1 per digit token teaches digits


class OldLogps(GroupMethod):
    """A loss of its own (REINFORCE on the sequence mean) that records the ratio it sees at each update."""

    name = "group-old-logps-test"
    paper = Paper("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300")
    wants_old_logps = True
    seen: list = []

    def loss(self, ctx):
        gap = ((ctx.token_logps.detach() - ctx.old_token_logps).abs() * ctx.mask).max().item()
        type(self).seen.append((ctx.step_in_generation, gap, ctx.rows_per_update))
        loss = -ctx.share(ctx.advantages * ctx.sequence_logps())
        return LossOutput(loss, metrics={"gap": gap})


def test_a_methods_loss_sees_old_logps_that_move_after_the_first_update(tmp_path):
    OldLogps.seen = []
    # a generation batch of 16 completions (4 prompts × 4) feeds 2 optimiser steps of 8
    trainer = group_trainer(tmp_path, method=OldLogps, steps=4, steps_per_generation=2)
    trainer.train()
    steps = [s for s, _, _ in OldLogps.seen]
    assert steps == [0, 1, 0, 1] and {rows for _, _, rows in OldLogps.seen} == {8}
    for step, gap, _ in OldLogps.seen:
        assert (gap < 1e-5) if step == 0 else (gap > 1e-4), OldLogps.seen  # float32 forward, same inputs
    assert "gap" in trainer.state.log_history[0]


def test_beta_uses_a_frozen_copy_of_a_model_built_in_memory(tmp_path):
    """TRL reloads a second model from config._name_or_path (an OSError for a model built in memory)."""
    trainer = group_trainer(tmp_path, method=GRPO({"beta": 0.1}), steps=3)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.train()
    kl = [e["kl"] for e in trainer.state.log_history if "kl" in e]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # policy = reference at the start, then apart


def test_two_identical_runs_give_identical_reward_curves(tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = group_trainer(tmp_path / name, steps=4)
        trainer.train()
        runs.append(curve(trainer))
    assert runs[0] == runs[1] and len(runs[0]) == 4


class WrongShape(GroupMethod):
    name = "group-wrong-shape-test"
    paper = Paper("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300")

    def advantages(self, rollouts, baseline):
        return baseline[:3]


class Broken(Scorer):
    name = "broken-count"

    def score(self, prompts, completions, **columns):
        return torch.zeros(len(completions) - 1)


def test_bad_batches_scorers_and_advantages_are_one_line(tmp_path):
    with pytest.raises(TrlPlusError, match="rollout.n: a group needs at least 2 completions per prompt, got 1"):
        group_trainer(tmp_path, rollout=Rollout(n=1))
    with pytest.raises(TrlPlusError, match=r"advantages\(\) returned shape \(3,\) for 8 rollouts"):
        group_trainer(tmp_path, method=WrongShape, steps=1).train()
    with pytest.raises(TrlPlusError, match=r"rollout.scorers: broken-count returned shape \(7, 1\) for 8 "
                                           r"completions; expected \(8, 1\)"):  # fmt: skip
        group_trainer(tmp_path, steps=1, scorers=[(Broken(), 1.0)]).train()


def test_a_group_recipe_trains_and_owned_keys_are_one_line(tmp_path):
    from trl_plus import train
    from trl_plus.config import load_recipe
    from trl_plus.run.validate import check_recipe

    rollout = {"n": 4, "decoding": {"max_new_tokens": 8}, "scorers": [{"name": "digits"}]}
    recipe = tiny_recipe(tmp_path, "grpo", PROMPTS, rollout=rollout,
                         training={"max_steps": 2, "per_device_train_batch_size": 8, "loss_type": "grpo"})  # fmt: skip
    result = train(recipe)
    assert result.global_step == 2 and "rollout/reward" in result.metrics
    for key, owner in (("num_generations", "rollout.n"), ("temperature", "rollout.decoding.temperature"),
                       ("beta", "method_args.beta")):  # fmt: skip
        with pytest.raises(TrlPlusError, match=rf"training.{key}: set by trl-plus; use {owner} instead"):
            check_recipe(load_recipe(recipe, [f"training.{key}=2"]))
    with pytest.raises(TrlPlusError, match=r"training.per_device_train_batch_size: 6 × gradient_accumulation_steps 1 "
                                           r"× 1 process\(es\) = 6 completions per generation batch, not a multiple "
                                           r"of rollout.n = 4: it counts completions"):  # fmt: skip
        train(load_recipe(recipe, ["training.per_device_train_batch_size=6"]))
    with pytest.raises(TrlPlusError, match=r"recipe.yaml: training: auto_find_batch_size is not supported by GRPO"):
        train(load_recipe(recipe, ["training.auto_find_batch_size=true"]))
    with pytest.raises(TrlPlusError, match=r"training.loss_typ: unknown key \(did you mean loss_type\?\)"):
        check_recipe(load_recipe(recipe, ["training.loss_typ=grpo"]))


def test_two_processes_see_one_batch_and_give_one_processs_advantages(tmp_path):
    """accelerate launch, 2 CPU processes: every process's advantages() sees the same gathered rollouts, and the
    advantages equal what one process computes from those rollouts."""
    proc = launch("tests/scripts/group_two_processes.py", str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["processes"] == 2
    assert seen[0]["rollouts"] == seen[1]["rollouts"] and len(seen[0]["rollouts"][0]["ids"]) == 8
    for batch, baseline in zip(seen[0]["rollouts"], seen[0]["baselines"], strict=True):
        reward = torch.tensor(batch["scores"], dtype=torch.float64).view(-1, 4)
        expected = (reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)
        torch.testing.assert_close(torch.tensor(baseline, dtype=torch.float64), expected.reshape(-1),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_estimate_counts_completions_and_a_reference_only_for_beta(tmp_path):
    from trl_plus.config import load_recipe
    from trl_plus.run.estimate import estimate

    plain = estimate(load_recipe("recipes/grpo.yaml"), prompt_tokens=32)
    assert plain.setup["reference"] == "none" and plain.setup["tokens"].startswith("384 (8 × 1 × 48")
    kl = estimate(load_recipe("recipes/grpo.yaml", ["method_args.beta=0.04"]))
    assert kl.setup["reference"] == "model"


def test_a_vector_scorer_takes_one_weight_per_output(tmp_path):
    from trl_plus.config import load_recipe
    from trl_plus.run.validate import check_recipe

    recipe = tiny_recipe(tmp_path, "grpo", PROMPTS, rollout={"n": 4, "scorers": [
        {"name": "length", "weight": [1.0, 0.5]}]}, training={"per_device_train_batch_size": 8})  # fmt: skip
    with pytest.raises(TrlPlusError, match=r"rollout.scorers.0.weight: 2 weights for the 1 outputs of length"):
        check_recipe(load_recipe(recipe))
    scorer = digits()
    assert scorer.output_weights(2.0) == [2.0] and scorer.output_weights([0.5]) == [0.5]
