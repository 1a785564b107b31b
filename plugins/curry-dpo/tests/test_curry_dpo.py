"""Curry-DPO: the card's pair order, ties, the DPO loss within a stage, the stages, three stages on the tiny model
(each starts at log 2 and raises its margin), the recipe, and bad rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from datasets import Dataset
from trl_plus_curry_dpo import CurryDPO, curriculum_pairs

from trl_plus import DPO, TrlPlusError, run_stages
from trl_plus.testing import cli, make_context, run_recipe_on_cpu, tiny_trainer, write_jsonl

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "recipes/data/curry_sample.jsonl"


def test_card_pair_order_from_scores_5_4_3_2():
    pairs = curriculum_pairs(["R1", "R2", "R3", "R4"], [5, 4, 3, 2])
    assert [(p["chosen"], p["rejected"], p["score_gap"], p["stage"]) for p in pairs] == [
        ("R1", "R4", 3.0, 1), ("R1", "R3", 2.0, 2), ("R1", "R2", 1.0, 3)]  # fmt: skip


def test_the_best_is_found_wherever_it_is_and_ties_give_no_zero_gap_pair():
    pairs = curriculum_pairs(["a", "b", "c", "d"], [3, 5, 5, 1])  # "b" and "c" tie for best: "b" (first) is best
    assert [(p["chosen"], p["rejected"], p["stage"]) for p in pairs] == [("b", "d", 1), ("b", "a", 2)]
    assert curriculum_pairs(["a", "b"], [2, 2]) == []
    assert [p["rejected"] for p in curriculum_pairs(list("abcd"), [5, 4, 3, 2], min_gap=1.0)] == ["d", "c"]


def test_prepare_data_expands_rows_and_removes_the_raw_columns():
    raw = Dataset.from_list([{"prompt": "p1", "responses": ["w", "x", "y", "z"], "scores": [2, 5, 3, 4]},
                             {"prompt": "p2", "responses": ["u", "v"], "scores": [1, 1]},
                             {"prompt": "p3", "responses": ["s", "t"], "scores": [0, 1]}])  # fmt: skip
    rows = CurryDPO().prepare_data(raw, "train").to_list()
    assert rows == [
        {"prompt": "p1", "chosen": "x", "rejected": "w", "score_gap": 3.0, "stage": 1},
        {"prompt": "p1", "chosen": "x", "rejected": "y", "score_gap": 2.0, "stage": 2},
        {"prompt": "p1", "chosen": "x", "rejected": "z", "score_gap": 1.0, "stage": 3},
        {"prompt": "p3", "chosen": "t", "rejected": "s", "score_gap": 1.0, "stage": 1},
    ]  # p2: a tie, no pair
    prepared = CurryDPO(max_stages=2).prepare_data(raw, "train")
    assert sorted(set(prepared["stage"])) == [1, 2]
    stages = CurryDPO().stages(CurryDPO().prepare_data(raw, "train"))
    assert [(s.name, s.refresh_reference) for s in stages] == [("1", False), ("2", True), ("3", True)]  # K − 1
    assert [s.rows(row) for s in stages for row in rows].count(True) == len(rows)  # each row in one stage
    assert not CurryDPO(refresh_reference=False).stages(prepared)[1].refresh_reference


def test_within_a_stage_the_loss_is_dpos_card_example():
    ctx = make_context([[[-12.0], [-20.0]], [[-15.0], [-18.0]]], [[[-13.0], [-19.0]], [[-14.0], [-18.5]]])
    assert CurryDPO(beta=0.1).loss(ctx).loss.item() == pytest.approx(0.684548, abs=1e-6)
    assert CurryDPO(beta=0.1).loss(ctx).loss.item() == DPO(beta=0.1).loss(ctx).loss.item()


def test_three_stages_on_the_tiny_model_each_start_at_log_2_and_raise_their_margin(tmp_path):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    trainer = tiny_trainer(CurryDPO, tmp_path, rows=rows, max_steps=4, learning_rate=1e-3,
                           training={"per_device_train_batch_size": 12})  # each step: the stage's 12 pairs  # fmt: skip
    stages = trainer.method.stages(trainer.train_dataset)
    assert [s.name for s in stages] == ["1", "2", "3"]
    run_stages(trainer, stages)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for name in ("1", "2", "3"):
        stage = [e for e in logs if e["stage"] == name]
        assert len(stage) == 4
        assert stage[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # π_θ = π_ref at every stage start
        assert stage[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        margins = [e["rewards/margins"] for e in stage]
        assert margins == sorted(margins) and margins[-1] > 0.2, (name, margins)  # measured 0.88, 0.52, 0.50


def test_the_recipe_runs_three_stages_on_the_cpu(tmp_path):
    result = run_recipe_on_cpu(ROOT / "recipes/curry-dpo.yaml", tmp_path / "run",
                               f"data.train.path={SAMPLE}", "training.max_steps=1")  # fmt: skip
    assert result.global_step == 3 and not result.interrupted
    assert sorted(p.name for p in Path(result.output_dir).glob("stage-*")) == ["stage-1", "stage-2", "stage-3"]
    assert (Path(result.output_dir) / "adapter_model.safetensors").is_file()
    assert not (Path(result.output_dir) / "ref").exists()  # the frozen reference copy is not part of the model


def test_rows_with_a_score_per_response_missing_are_one_line_errors(tmp_path, capsys):
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1.0, 2.0]}]
    with pytest.raises(TrlPlusError, match=r"row 1: column 'scores' has 2 values but 'responses' has 3"):
        tiny_trainer(CurryDPO, tmp_path, rows=rows)
    write_jsonl([{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 1.0]}], tmp_path / "ties.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: curry-dpo\nmodel: {name_or_path: tiny-llama}\ndata: {train: {path: ties.jsonl}}\n")
    assert cli("validate", str(recipe)) == 2
    assert capsys.readouterr().err.strip().endswith(
        "ties.jsonl): method 'curry-dpo' built no training rows from the 1 rows of the data: check the "
        "columns its README describes")
