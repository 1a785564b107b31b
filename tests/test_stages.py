"""Training stages: stages run in order with a fresh optimiser, the reference is refreshed (π_ref ← π_θ) in every
reference mode, a run interrupted in stage 2 resumes to the same loss curve, and the recipe's stages block."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import first_batch
from trl_plus import DPO, Stage, TrlPlusError
from trl_plus.config import load_recipe
from trl_plus.run.validate import plan_stages
from trl_plus.testing import interrupt_at_step, preference_rows, registered, tiny_trainer, write_jsonl
from trl_plus.trainers.stages import STAGE_DONE, run_stages

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def staged_rows(n=24, stages=3):
    return [{**row, "stage": 1 + i % stages} for i, row in enumerate(preference_rows(n))]


class StagedDPO(DPO):
    """DPO in three stages by the data's ``stage`` column, the reference refreshed before stages 2 and 3."""

    name = "test-staged-dpo"

    def stages(self, dataset):
        return [Stage(str(k), rows=lambda row, k=k: row["stage"] == k, refresh_reference=k > 1) for k in (1, 2, 3)]


def staged_trainer(tmp_path, mode, steps=2, **kwargs):
    peft, lora = {}, kwargs.pop("lora", False)
    if mode == "adapter" or lora:
        from peft import LoraConfig

        peft = {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    return tiny_trainer(StagedDPO, tmp_path, rows=staged_rows(), max_steps=steps, reference_mode=mode,
                        training={"per_device_train_batch_size": 4, **kwargs}, **peft)  # fmt: skip


def policy_logps(trainer, batch):
    with torch.no_grad():
        return trainer.frozen_token_logps(trainer.model, batch)


@pytest.mark.parametrize("mode", ["model", "adapter", "precomputed"])
def test_after_a_refresh_the_next_stage_starts_at_log_2_and_the_reference_is_the_policy(tmp_path, mode):
    trainer = staged_trainer(tmp_path, mode, lora=mode == "precomputed")
    stages = trainer.method.stages(trainer.train_dataset)
    run_stages(trainer, stages[:1])
    batch = first_batch(trainer, 4)  # stage-1 rows carry stage-1 columns in precomputed mode: recollate after
    before = trainer.reference_token_logps(batch)
    policy = policy_logps(trainer, batch)
    assert (before - policy).abs().max() > 1e-3  # stage 1 moved the policy away from its reference

    trainer.train_dataset = trainer.train_dataset.filter(stages[1].rows)
    trainer.refresh_reference()
    batch = first_batch(trainer, 4)
    torch.testing.assert_close(trainer.reference_token_logps(batch), policy_logps(trainer, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["model", "adapter", "precomputed"])
def test_three_stages_in_each_reference_mode(tmp_path, mode):
    trainer = staged_trainer(tmp_path, mode, lora=mode == "precomputed")
    run_stages(trainer, trainer.method.stages(trainer.train_dataset))
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["stage"] for e in logs] == ["1", "1", "2", "2", "3", "3"]
    assert [e["step"] for e in logs] == [1, 2, 3, 4, 5, 6]  # one run-wide step count
    assert trainer.state.global_step == 6
    for first in (logs[0], logs[2], logs[4]):  # each stage's first step: π_θ = π_ref (stage 1: the start)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # and they train in between
    for k in (1, 2, 3):
        folder = Path(tmp_path) / f"stage-{k}"
        assert (folder / STAGE_DONE).is_file() and (folder / "trainer_state.json").is_file()
    if mode == "adapter":
        assert list(trainer.model.peft_config) == ["default"]  # the frozen "ref" copy is gone after the last stage


def test_without_refresh_the_reference_stays_the_start(tmp_path):
    trainer = staged_trainer(tmp_path, "model", steps=1)
    stages = [Stage(s.name, s.rows, refresh_reference=False) for s in trainer.method.stages(trainer.train_dataset)]
    run_stages(trainer, stages[:2])
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)


def test_each_stage_gets_a_fresh_optimiser(tmp_path):
    trainer = staged_trainer(tmp_path, "model", steps=1, lr_scheduler_type="constant")
    optimisers = []
    original = trainer.create_optimizer

    def spy(*args, **kwargs):
        optimiser = original(*args, **kwargs)
        optimisers.append(optimiser)
        return optimiser

    trainer.create_optimizer = spy
    run_stages(trainer, trainer.method.stages(trainer.train_dataset))
    assert len(optimisers) == 3 and len({id(o) for o in optimisers}) == 3
    assert len(trainer.accelerator._optimizers) == 1  # the accelerator holds only the last one


def test_a_reference_free_run_cannot_refresh(tmp_path):
    trainer = staged_trainer(tmp_path, "model")
    trainer.reference_mode = "none"
    with pytest.raises(TrlPlusError, match="reference-free; a stage cannot refresh"):
        run_stages(trainer, trainer.method.stages(trainer.train_dataset))


# -- through a recipe: resume, bad input ------------------------------------------------------------------------


def staged_recipe(tmp_path, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(staged_rows(), tmp_path / "staged.jsonl")
    recipe = {
        "method": "dpo",
        "model": {"name_or_path": "tiny-llama", "dtype": "float32", "lora": LORA},
        "data": {"train": {"path": data}},
        "stages": {"by": "stage", "refresh_reference": True},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "per_device_train_batch_size": 4,
                     "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 1, "disable_tqdm": True,
                     "activation_checkpointing": False, "report_to": "none", "seed": 0},
        **extra,
    }  # fmt: skip
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def losses(run_dir):
    import json

    state = json.loads((Path(run_dir) / "trainer_state.json").read_text())
    return [(e["stage"], e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]


def final_adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter_model.safetensors"))


def test_interrupted_in_stage_2_and_resumed_the_loss_curve_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from trl_plus import train

    whole = train(staged_recipe(tmp_path / "whole"))
    assert [s for s, _, _ in losses(whole.output_dir)] == ["1"] * 3 + ["2"] * 3 + ["3"] * 3

    recipe = staged_recipe(tmp_path / "cut")
    interrupt_at_step(monkeypatch, 5)  # stage 2's second step
    cut = train(recipe)
    assert cut.interrupted and cut.checkpoint.endswith("stage-2/checkpoint-1")
    monkeypatch.undo()
    resumed = train(recipe, ["training.resume_from_checkpoint=true"])
    assert not resumed.interrupted and resumed.global_step == 9

    expected, got = losses(whole.output_dir), losses(resumed.output_dir)
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in expected]
    assert [loss for _, _, loss in got] == pytest.approx([loss for _, _, loss in expected], abs=1e-6)
    assert got[3][2] == pytest.approx(math.log(2), abs=1e-6)  # stage 2 starts from the refreshed reference
    a, b = final_adapter(whole.output_dir), final_adapter(resumed.output_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)


def test_the_recipe_names_stages_and_bad_stage_names_are_one_line_errors(tmp_path):
    from trl_plus.registry import get_registry
    from trl_plus.run.validate import load_split

    recipe = load_recipe(staged_recipe(tmp_path), ["stages.only=[1, 3]"])
    method = get_registry().get("dpo")()
    stages = plan_stages(recipe, method, load_split(recipe, method, "train"))
    assert [s.name for s in stages] == ["1", "3"] and [s.refresh_reference for s in stages] == [False, True]

    recipe = load_recipe(staged_recipe(tmp_path), ["stages.only=[1, 7]"])
    with pytest.raises(TrlPlusError, match=r"^--set stages.only: no stage '7'; the stages are 1, 2, 3$"):
        plan_stages(recipe, method, load_split(recipe, method, "train"))

    recipe = load_recipe(staged_recipe(tmp_path), ["stages.by=level"])
    with pytest.raises(TrlPlusError, match=r"^--set stages.by: the data has no column 'level'; it has prompt, chosen"):
        plan_stages(recipe, method, load_split(recipe, method, "train"))

    recipe = load_recipe(staged_recipe(tmp_path), ["stages.by=null", "stages.only=[1]"])
    with pytest.raises(TrlPlusError, match=r"^--set stages.only: method 'dpo' has no stages; use stages.by"):
        plan_stages(recipe, method, load_split(recipe, method, "train"))


def test_refresh_asked_of_a_reference_free_method_is_an_error_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import transformers
    from test_trainer import MeanLogpFree  # reference-free

    from trl_plus.testing import cli

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the recipe was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    with registered(MeanLogpFree):
        path = staged_recipe(tmp_path, method="test-free")
        assert cli("train", path) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {path}: stages.refresh_reference: method 'test-free' runs without a reference, so there "
                     "is none to refresh; set stages.refresh_reference: false")
