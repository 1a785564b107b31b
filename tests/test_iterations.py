"""Iterated online training (a recipe's ``iterations:`` block, ``trl_plus.trainers.iterations``): prompts split
per iteration, replay, the reference promoted to the last iteration's policy (first loss ln 2, weights equal),
per-iteration training overrides, the generation-side reward rising across iterations, resume of an interrupted
iteration to the same curve, and the block's one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from trl_plus import DPO, OnlineMethod, Paper, TrlPlusError
from trl_plus.testing import interrupt_at_step, iteration_firsts, registered, tiny_recipe
from trl_plus.trainers.iterations import iteration_prompts, replay_rows

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


class IterativeDPOTest(OnlineMethod, DPO):
    name = "iterative-dpo-test"
    paper = Paper("Direct Language Model Alignment from Online AI Feedback", "2402.04792")


def test_prompt_slices_and_replay_fractions():
    assert [list(r) for r in iteration_prompts(7, 3, "slices")] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(r) for r in iteration_prompts(4, 2, "all")] == [[0, 1, 2, 3]] * 2
    with pytest.raises(TrlPlusError, match="2 prompts cannot make 3 disjoint slices"):
        iteration_prompts(2, 3, "slices")
    history = [[{}] * 10, [{}] * 20]
    picked = replay_rows(history, [0.3, 0.15], seed=0)  # 30 % of the last iteration, 15 % of the one before
    assert sum(1 for i, _ in picked if i == 1) == 6 and sum(1 for i, _ in picked if i == 0) == 2
    assert len(set(picked)) == len(picked) and replay_rows(history, [0.3, 0.15], seed=0) == picked
    assert replay_rows(history[:1], [0.5, 0.5], seed=1) == replay_rows(history[:1], [0.5], seed=1)  # no t−2 yet


def iterated_recipe(tmp_path: Path, lora: bool = False, **extra) -> str:
    blocks = {
        "model": {"lora": LORA} if lora else {},
        "rollout": {"n": 2, "decoding": {"max_new_tokens": 12, "temperature": 1.0}, "scorers": [{"name": "digits"}]},
        "iterations": {"count": 3, "replay": [0.5], "training": [{}, {"learning_rate": 5e-3}]},
        "training": {"max_steps": 4, "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 2},
    }  # fmt: skip
    for key, value in extra.items():
        blocks[key] = {**blocks.get(key, {}), **value}
    return tiny_recipe(tmp_path, "iterative-dpo-test", [{"prompt": f"Count to {i}:"} for i in range(24)], **blocks)


def history(run_dir) -> list[dict]:
    return json.loads((Path(run_dir) / "trainer_state.json").read_text())["log_history"]


def losses(run_dir) -> list[tuple[int, int, float]]:
    return [(e["iteration"], e["step"], e["loss"]) for e in history(run_dir) if "loss" in e]


def test_iterations_promote_the_reference_replay_rows_and_raise_the_generation_side_reward(tmp_path):
    from safetensors.torch import load_file

    from trl_plus import train

    with registered(IterativeDPOTest):
        result = train(iterated_recipe(tmp_path, iterations={"training": [{}, {}, {"learning_rate": 5e-3,
                                                                                  "max_steps": 2}]},
                                       training={"per_device_train_batch_size": 8, "max_steps": 8},
                                       rollout={"n": 4}))  # fmt: skip
    run = Path(result.output_dir)
    assert result.global_step == 8 + 8 + 2
    logs = history(run)
    firsts = iteration_firsts(run)
    for first in firsts:  # each iteration starts at policy = reference: the promoted one
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {e["learning_rate"] for e in logs if e["iteration"] == 2 and "learning_rate" in e} == {1e-2}
    assert {e["learning_rate"] for e in logs if e["iteration"] == 3 and "learning_rate" in e} == {5e-3}

    rows = [len((run / f"iter-{t}" / "rows.jsonl").read_text().splitlines()) for t in (1, 2, 3)]
    assert rows == [8, 8, 8]  # 24 prompts in three disjoint slices, one pair each
    replay = [json.loads((run / f"iter-{t}" / "replay.json").read_text())["rows"] for t in (1, 2, 3)]
    assert replay[0] == [] and len(replay[1]) == 4 and {i for i, _ in replay[1]} == {0}
    assert {i for i, _ in replay[2]} == {1}  # replay: [0.5] draws from the last iteration only
    assert json.loads((run / "iter-2" / "iteration.json").read_text()) == {"iteration": 2, "steps": 8, "rows": 8,
                                                                            "replayed": 4}  # fmt: skip
    # the generation-side reward of each iteration's samples (logged with its first step) rises
    rewards = [first["rollout/reward"] for first in firsts]
    assert rewards[2] - rewards[0] > 3.0, rewards  # measured 1.53 -> 2.97 -> 6.94 (16 steps)
    final = load_file(str(run / "model.safetensors"))
    last = load_file(str(run / "iter-3" / "model.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_the_reference_of_iteration_2_is_the_policy_at_the_end_of_iteration_1(tmp_path, monkeypatch):
    from trl_plus.config import load_recipe
    from trl_plus.run.train import build_trainer
    from trl_plus.trainers import iterations
    from trl_plus.trainers.preference import PlusTrainer

    seen = []
    original = PlusTrainer.refresh_reference

    def spy(self):
        before = {k: v.clone() for k, v in self.accelerator.unwrap_model(self.model).state_dict().items()}
        original(self)
        seen.append(all(torch.equal(before[k], v) for k, v in self.ref_model.state_dict().items()))

    monkeypatch.setattr(PlusTrainer, "refresh_reference", spy)
    with registered(IterativeDPOTest):
        trainer = build_trainer(load_recipe(iterated_recipe(tmp_path, iterations={"count": 2})))
        initial = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
        iterations.run_iterations(trainer, trainer.iterations)
    assert seen == [True]  # promoted once, before iteration 2, to exactly the policy of then
    assert not all(torch.equal(initial[k], v) for k, v in trainer.ref_model.state_dict().items())


def test_an_interrupted_iteration_resumes_to_the_same_curve(tmp_path, monkeypatch):
    from trl_plus import train

    with registered(IterativeDPOTest):
        whole = train(iterated_recipe(tmp_path / "whole", lora=True, iterations={"count": 2}))
        recipe = iterated_recipe(tmp_path / "cut", lora=True, iterations={"count": 2})
        interrupt_at_step(monkeypatch, 7)  # iteration 2's third step, after its checkpoint-2
        cut = train(recipe)
        assert cut.interrupted and cut.checkpoint.endswith("iter-2/checkpoint-2")
        monkeypatch.undo()
        resumed = train(recipe, ["training.resume_from_checkpoint=true"])
    assert not resumed.interrupted and resumed.global_step == 8
    expected, got = losses(whole.output_dir), losses(resumed.output_dir)
    assert [(t, s) for t, s, _ in got] == [(t, s) for t, s, _ in expected]
    assert [loss for _, _, loss in got] == pytest.approx([loss for _, _, loss in expected], abs=1e-6)
    assert got[4][2] == pytest.approx(math.log(2), abs=1e-6)  # iteration 2 starts from the promoted reference


def test_bad_iterations_blocks_are_one_line(tmp_path, monkeypatch):
    from trl_plus.config import load_recipe
    from trl_plus.run.validate import check_recipe
    from trl_plus.testing import forbid_model_loading

    forbid_model_loading(monkeypatch)
    cases = [
        ({"iterations": {"training": [{"learning_rat": 1.0}]}},
         r"iterations.training.0.learning_rat: unknown key \(did you mean learning_rate\?\)"),
        ({"iterations": {"training": [{}, {}, {}, {}]}}, r"iterations.training: 4 entries for 3 iterations"),
        ({"iterations": {"training": [{"output_dir": "x"}]}}, r"iterations.training.0.output_dir: a run-wide"),
        ({"iterations": {"replay": [1.5]}}, r"iterations.replay.0: .*less than or equal to 1"),
        ({"rollout": {"when": "step"}}, r"rollout.when: step samples before every step"),
        ({"stages": {"by": "prompt"}}, r"iterations: a run has stages or iterations, not both"),
    ]  # fmt: skip
    with registered(IterativeDPOTest):
        for extra, message in cases:
            with pytest.raises(TrlPlusError, match=message):
                check_recipe(load_recipe(iterated_recipe(tmp_path, **extra)))
    recipe = yaml.safe_load(Path(iterated_recipe(tmp_path)).read_text())
    recipe["method"] = "dpo"
    del recipe["rollout"]
    with pytest.raises(TrlPlusError, match=r"iterations: method 'dpo' trains on its data, it samples nothing"):
        check_recipe(load_recipe(recipe))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_precomputed_reference_is_recomputed_per_iteration_and_trains_as_the_live_one(tmp_path, monkeypatch, lora):
    """reference.mode: precomputed in an iterated run: each iteration's rows get the reference's log-probs once,
    with the policy as it stands (adapter on), so no step runs a reference forward, and the curve equals the live
    reference's (the frozen ref adapter, or the reference model)."""
    from trl_plus import train
    from trl_plus.trainers.frozen import REF_COLUMN
    from trl_plus.trainers.preference import PlusTrainer

    with registered(IterativeDPOTest):
        live = train(iterated_recipe(tmp_path / "live", lora=lora, iterations={"count": 2}))
        calls = []
        original = PlusTrainer.reference_token_logps
        monkeypatch.setattr(PlusTrainer, "reference_token_logps",
                            lambda self, inputs: calls.append(REF_COLUMN in inputs) or original(self, inputs))
        pre = train(iterated_recipe(tmp_path / "pre", lora=lora, iterations={"count": 2},
                                    reference={"mode": "precomputed"}))  # fmt: skip
    assert len(calls) == 8 and all(calls)  # every step read the precomputed columns: no reference forward
    expected, got = losses(live.output_dir), losses(pre.output_dir)
    assert [(t, s) for t, s, _ in got] == [(t, s) for t, s, _ in expected]
    assert [loss for _, _, loss in got] == pytest.approx([loss for _, _, loss in expected], abs=1e-5)
    for first in iteration_firsts(pre.output_dir):
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
