"""The CPU quickstart learns, and a run that stops keeps what it had."""

from __future__ import annotations

import pytest

import trl_plus
from trl_plus.api import read_state
from trl_plus.trainer import PlusTrainer


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return trl_plus.train("recipes/quickstart.yaml", [f"training.output_dir={out}", "training.disable_tqdm=true"])


def test_quickstart_margin_and_accuracy_grow(quickstart):
    logs = [e for e in read_state(quickstart.output_dir)["log_history"] if "rewards/margins" in e]
    first, last = logs[0], logs[-1]
    assert quickstart.global_step == 40
    assert last["rewards/margins"] > first["rewards/margins"] + 1.0
    assert last["rewards/accuracies"] > first["rewards/accuracies"]
    assert last["rewards/accuracies"] >= 0.9
    evals = [e for e in read_state(quickstart.output_dir)["log_history"] if "eval_rewards/margins" in e]
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9  # held-out pairs too
    assert "reward margin" in quickstart.summary()


def test_ctrl_c_keeps_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    original = PlusTrainer.training_step

    def interrupt_at_third_step(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PlusTrainer, "training_step", interrupt_at_third_step)
    overrides = [f"training.output_dir={tmp_path}", "training.max_steps=5", "data.eval=null", "training.disable_tqdm=true"]
    result = trl_plus.train("recipes/quickstart.yaml", overrides)
    assert result.interrupted and result.global_step == 2
    assert result.checkpoint == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").exists()

    steps_run = []

    def counting(self, *args, **kwargs):
        steps_run.append(self.state.global_step + 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PlusTrainer, "training_step", counting)
    resumed = trl_plus.train("recipes/quickstart.yaml", [*overrides, "training.resume_from_checkpoint=true"])
    assert not resumed.interrupted and resumed.global_step == 5
    assert steps_run == [3, 4, 5]  # continued from the checkpoint, not from scratch
