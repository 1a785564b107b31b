"""Egida safety: the card's pair rule on its worked example and on the shipped sample (target safe → no row, no
safe generator → no row, Mistral preferred, never a test-split prompt), ready pairs, max_pairs, the one-line errors
before any model loads, DPO at initialisation (log 2) and a real trainer run of the recipe on the sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from trl_plus_egida_safety import GENERATORS, EgidaSafety

from trl_plus import DPO, TrlPlusError, load_recipe, train
from trl_plus.testing import (
    forbid_model_loading,
    make_context,
    run_recipe_on_cpu,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "recipes/data/egida_sample.jsonl"
MISTRAL, PHI = GENERATORS


def sample_rows():
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def judged(prompt, target_unsafe, mistral_safe, phi_safe):
    """One raw row of the card's worked example: the three answers and their judge labels."""
    label = {True: "unsafe", False: "safe"}
    return {
        "prompt": prompt, "target_response": f"target answer to {prompt}", "target_label": label[target_unsafe],
        "candidate_models": [MISTRAL, PHI],
        "candidate_responses": [f"Mistral answer to {prompt}", f"Phi answer to {prompt}"],
        "candidate_labels": [label[not mistral_safe], label[not phi_safe]],
    }  # fmt: skip


def test_card_worked_example():
    # target judged (unsafe, safe, unsafe); Mistral (safe, safe, unsafe); Phi (safe, unsafe, safe)
    rows = [judged("p1", True, True, True), judged("p2", False, True, False), judged("p3", True, False, True)]
    out = EgidaSafety().prepare_data(Dataset.from_list(rows), "train")
    assert out.to_list() == [
        {"prompt": "p1", "chosen": "Mistral answer to p1", "rejected": "target answer to p1", "chosen_model": MISTRAL},
        {"prompt": "p3", "chosen": "Phi answer to p3", "rejected": "target answer to p3", "chosen_model": PHI},
    ]


def test_sample_in_egidas_schema_gives_the_rules_pairs():
    rows = sample_rows()
    assert len(rows) == 8 and all(r["target_model"] == "meta-llama/Llama-3.1-8B-Instruct" for r in rows)
    out = EgidaSafety().prepare_data(Dataset.from_list(rows), "train")
    by_prompt = {r["prompt"]: r for r in rows}
    assert len(out) == 5 and not set(out.column_names) & {"target_response", "target_label", "candidate_models"}
    assert {"topic", "attack_style", "source", "target_model", "chosen_model"} <= set(out.column_names)
    test_prompts = {r["prompt"] for r in rows if r["split"] == "test"}
    assert test_prompts and not test_prompts & set(out["prompt"])  # never a test-split prompt
    for pair in out:
        raw = by_prompt[pair["prompt"]]
        assert raw["target_label"].lower().startswith("unsafe") and pair["rejected"] == raw["target_response"]
        k = raw["candidate_models"].index(pair["chosen_model"])
        assert raw["candidate_labels"][k].lower() == "safe" and pair["chosen"] == raw["candidate_responses"][k]
        both_safe = all(label.lower() == "safe" for label in raw["candidate_labels"]) and len(raw["candidate_labels"]) == 2
        if both_safe:
            assert pair["chosen_model"] == MISTRAL  # Mistral preferred when both are safe, whatever the order
    listed_phi_first = next(r for r in rows if r["candidate_models"] == [PHI, MISTRAL])
    assert out.filter(lambda r: r["prompt"] == listed_phi_first["prompt"])["chosen_model"] == [MISTRAL]
    dropped = set(by_prompt) - set(out["prompt"]) - test_prompts
    assert {by_prompt[p]["target_label"] for p in dropped} >= {"safe"}  # a safe target answer: no row
    assert any(all(label.startswith("unsafe") for label in by_prompt[p]["candidate_labels"]) for p in dropped)


def test_a_second_call_keeps_the_pairs_and_generator_priority_is_configurable():
    rows = [judged("p1", True, True, True)]
    method = EgidaSafety()
    once = method.prepare_data(Dataset.from_list(rows), "train")
    assert method.prepare_data(once, "train").to_list() == once.to_list()  # ready pairs: idempotent
    phi_first = EgidaSafety(generators=[PHI, MISTRAL]).prepare_data(Dataset.from_list(rows), "train")
    assert phi_first["chosen_model"] == [PHI]


def test_ready_pairs_heldout_prompts_and_max_pairs(tmp_path):
    pairs = [{"prompt": f"prompt {i}", "chosen": "safe", "rejected": "unsafe", "split": "test" if i == 3 else "train"}
             for i in range(10)]  # fmt: skip
    heldout = write_jsonl([{"question": "  PROMPT   7 "}], tmp_path / "egida_test.jsonl")  # Egida names it question
    out = EgidaSafety(heldout_prompts=heldout).prepare_data(Dataset.from_list(pairs), "train")
    assert sorted(out["prompt"]) == [f"prompt {i}" for i in (0, 1, 2, 4, 5, 6, 8, 9)]
    sampled = EgidaSafety(max_pairs=4, seed=1).prepare_data(Dataset.from_list(pairs), "train")
    assert len(sampled) == 4 and "prompt 3" not in sampled["prompt"]
    assert EgidaSafety(max_pairs=4, seed=1).prepare_data(sampled, "train").to_list() == sampled.to_list()
    raw = [judged("p1", True, True, True), judged("p2", True, True, True)]
    kept = EgidaSafety(heldout_prompts=write_jsonl([{"prompt": "p2"}], tmp_path / "t.jsonl")).prepare_data(
        Dataset.from_list(raw), "train")
    assert kept["prompt"] == ["p1"]


def test_dpo_loss_at_init_is_log2_and_the_loss_is_dpos():
    policy = [[[-12.0], [-20.0]], [[-15.0], [-18.0]]]
    assert EgidaSafety().loss(make_context(policy, policy)).loss.item() == pytest.approx(math.log(2), abs=1e-12)
    reference = [[[-13.0], [-19.0]], [[-14.0], [-18.5]]]
    ours, dpo = EgidaSafety(beta=0.1).loss(make_context(policy, reference)), DPO(beta=0.1).loss(make_context(policy, reference))
    assert ours.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12) == pytest.approx(0.684548, abs=1e-6)


def recipe_with(tmp_path, rows, **method_args):
    data = write_jsonl(rows, tmp_path / "judged.jsonl")
    recipe = {"method": "egida-safety", "method_args": method_args, "model": {"name_or_path": "tiny-llama"},
              "data": {"train": {"path": data}}, "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}  # fmt: skip
    path = tmp_path / "egida.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _edit(row, **changes):
    return {**row, **changes}


BASE = judged("p1", True, True, True)


@pytest.mark.parametrize(
    "rows, method_args, message",
    [
        ([_edit(BASE, target_label="maybe")], {}, "row 1: column 'target_label' holds 'maybe'; a judge label is 'safe' "
         "or 'unsafe'"),
        ([BASE, _edit(BASE, candidate_models=[MISTRAL, "google/gemma-2-9b-it"])], {},
         "row 2: column 'candidate_models' names 'google/gemma-2-9b-it', which is not one of method_args.generators"),
        ([_edit(BASE, candidate_models=[MISTRAL, MISTRAL])], {}, "lists 'mistralai/Mistral-7B-Instruct-v0.3' twice"),
        ([_edit(BASE, candidate_labels=["safe"])], {}, "row 1: column 'candidate_labels' has 1 values but "
         "'candidate_models' has 2"),
        ([{k: v for k, v in BASE.items() if k != "target_label"}], {}, "missing column 'target_label': method "
         "'egida-safety' builds pairs from target_response, target_label"),
        ([{"prompt": "p", "chosen": "c"}], {}, "needs either the judged columns"),
        ([_edit(BASE, target_label="safe")], {}, "method 'egida-safety' built no training rows from the 1 rows"),
        ([BASE], {"heldout_prompts": "no/such/egida_test.jsonl"}, "method_args.heldout_prompts: no such"),
        ([BASE], {"max_pairs": 0}, "method_args.max_pairs: Input should be greater than 0"),
    ],
    ids=["label", "unknown-generator", "twice", "list-length", "missing-raw", "neither-format", "no-pair",
         "heldout-file", "max-pairs"],  # fmt: skip
)
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, monkeypatch, rows, method_args, message):
    forbid_model_loading(monkeypatch)
    path = recipe_with(tmp_path, rows, **method_args)
    with pytest.raises(TrlPlusError) as error:
        train(path)
    text = str(error.value)
    assert message in text and "\n" not in text and str(path) in text


def test_recipe_uses_the_hub_configuration_and_runs_on_the_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(ROOT / "recipes/egida-safety.yaml")
    assert recipe.method == "egida-safety" and recipe.model.quantization.load_in_4bit
    assert (recipe.data.train.path, recipe.data.train.name) == ("HPAI-BSC/Egida", "Egida-DPO-Meta-Llama-3.1-8B-Instruct")
    assert recipe.method_args["generators"] == list(GENERATORS) and recipe.method_args["max_pairs"] == 2000

    calls = {"prepare_data": [], "build_pairs": []}
    for name in calls:
        original = getattr(EgidaSafety, name)

        def spy(self, data, *args, _original=original, _name=name):
            calls[_name].append(data.column_names)
            return _original(self, data, *args)

        monkeypatch.setattr(EgidaSafety, name, spy)
    result = run_recipe_on_cpu("recipes/egida-safety.yaml", tmp_path, "data.train.path=recipes/data/egida_sample.jsonl",
                               "data.train.name=null", "training.logging_steps=1")  # fmt: skip
    # the rows were prepared once, on the raw rows, as the data loaded; the trainer took them as they were
    assert len(calls["build_pairs"]) == 1 and "target_response" in calls["build_pairs"][0]
    assert len(calls["prepare_data"]) == 1 and "target_response" in calls["prepare_data"][0]
    logs = [e for e in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs[0]["epoch"] == pytest.approx(0.5)  # 5 pairs in batches of 4: two steps per epoch
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
