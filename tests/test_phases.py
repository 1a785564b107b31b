"""Rounds of phases (a recipe's ``phases:`` block, ``trl_plus.run.phases``): methods take turns on one policy
(sft on PlusTrainer, grpo on PlusGRPOTrainer), each phase stops at the first logged step that meets its rule, the
rounds stop when the round's last logged value meets the outer rule, and bad blocks are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_plus import TrlPlusError
from trl_plus.testing import preference_rows, tiny_recipe, write_jsonl

PROMPTS = [{"prompt": f"Count to {i}:"} for i in range(16)]


def phased(tmp_path, until_inner=3.0, until_outer=100.0, rounds=3, **phase_overrides):
    liked = write_jsonl([{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(8)],
                        tmp_path / "liked.jsonl")  # fmt: skip
    phases = {"rounds": rounds, "until": {"key": "rollout/reward", "at_least": until_outer}, "sequence": [
        {"name": "bc", "method": "sft", "data": liked, "training": {"num_train_epochs": 1, "max_steps": -1}},
        {"name": "rl", "until": {"key": "rollout/reward", "at_least": until_inner}, "training": {"max_steps": 8},
         **phase_overrides},
    ]}  # fmt: skip
    return tiny_recipe(tmp_path, "grpo", PROMPTS, phases=phases,
                       rollout={"n": 4, "decoding": {"max_new_tokens": 8}, "scorers": [{"name": "digits"}]},
                       training={"per_device_train_batch_size": 8, "learning_rate": 1e-2, "save_strategy": "no"})


def test_rounds_alternate_one_bc_epoch_and_rl_until_its_rule_then_stop_at_the_outer_rule(tmp_path):
    from trl_plus import train

    result = train(phased(tmp_path, until_inner=2.0, until_outer=2.0))
    run = Path(result.output_dir)
    log = json.loads((run / "trainer_state.json").read_text())["log_history"]
    rounds = sorted({e["round"] for e in log})
    summary = json.loads((run / "phases.json").read_text())
    for r in rounds:
        bc = [e for e in log if e["round"] == r and e["phase"] == "bc" and "loss" in e]
        rl = [e for e in log if e["round"] == r and e["phase"] == "rl" and "rollout/reward" in e]
        assert len(bc) == 1 and bc[0]["epoch"] == pytest.approx(1.0)  # 8 liked rows, batch 8: one epoch, one step
        assert 1 <= len(rl) <= 8
        reached = [e["rollout/reward"] >= 2.0 for e in rl]
        assert not any(reached[:-1]) and (reached[-1] or len(rl) == 8)  # stopped at the first step that met it
    last = [e["rollout/reward"] for e in log if e["round"] == rounds[-1] and "rollout/reward" in e][-1]
    assert summary["stopped"] == (last >= 2.0) and summary["rounds"] == len(rounds)
    assert summary["stopped"] or len(rounds) == 3
    steps = [e["step"] for e in log if "loss" in e]
    assert steps == sorted(steps) and summary["steps"] == result.global_step == steps[-1]
    assert all((run / f"round-{r}-{p}" / "model.safetensors").is_file() for r in rounds for p in ("bc", "rl"))
    assert (run / "model.safetensors").is_file()


def test_bad_phases_blocks_are_one_line(tmp_path):
    import yaml

    from trl_plus import train
    from trl_plus.config import load_recipe
    from trl_plus.run.validate import check_recipe

    recipe = phased(tmp_path)

    def edited(change):
        data = yaml.safe_load(Path(recipe).read_text())
        change(data["phases"])
        path = tmp_path / "edited.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    cases = [
        (lambda p: p["sequence"][1].update(method="sftt"),
         r"edited.yaml: phases.sequence.1 \(rl\): method: unknown method 'sftt' \(did you mean sft"),
        (lambda p: p["sequence"][1].update(name="bc"), r"phases.sequence: .*phase names repeat: \['bc', 'bc'\]"),
        (lambda p: p["until"].update(at_most=1), r"phases.until: .*give exactly one of at_least and at_most"),
        (lambda p: p["sequence"][1]["training"].update(num_generations=2),
         r"phases.sequence.1 \(rl\): training.num_generations: set by trl-plus; use rollout.n"),
    ]  # fmt: skip
    for change, message in cases:
        with pytest.raises(TrlPlusError, match=message):
            check_recipe(load_recipe(edited(change)))
    with pytest.raises(TrlPlusError, match="a run with phases does not resume yet"):
        train(recipe, ["training.resume_from_checkpoint=true"])
