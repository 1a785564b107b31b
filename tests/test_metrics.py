"""Metrics and scorers: the accuracy conventions, the registry, the one runner behind the recipe's ``metrics:``
(during training) and ``trl-plus eval --metric`` (on a checkpoint), ``trl-plus score``, ``trl-plus compare``,
``trl-plus list --by``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from trl_plus import Metric, Needs, TrlPlusError, pair_accuracy
from trl_plus.testing import cli, preference_rows, run_metric, tiny_trainer, training_logs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_the_three_accuracy_conventions_differ_only_on_ties():
    better = torch.tensor([1.0, 0.0, 2.0, -1.0], dtype=torch.float64)
    worse = torch.tensor([0.0, 0.0, 2.0, 0.0], dtype=torch.float64)  # right, tie, tie, wrong
    assert pair_accuracy(better, worse, "half").tolist() == [1.0, 0.5, 0.5, 0.0]  # the eval table
    assert pair_accuracy(better, worse, "lose").tolist() == [1.0, 0.0, 0.0, 0.0]  # TRL's rewards/accuracies
    assert pair_accuracy(better, worse, "win").tolist() == [1.0, 1.0, 1.0, 0.0]  # ranking accuracy (≥)


def test_strict_convention_is_trls_rewards_accuracies():
    """TRL's DPOTrainer logs (chosen_rewards > rejected_rewards).float().mean(): the "lose" convention."""
    chosen = torch.tensor([0.3, 0.0, -0.2])
    rejected = torch.tensor([0.1, 0.0, 0.5])
    assert pair_accuracy(chosen, rejected, "lose").mean().item() == (chosen > rejected).float().mean().item()


def test_unknown_metric_and_scorer_name_the_nearest(tmp_path):
    from trl_plus import get_registry

    with pytest.raises(TrlPlusError, match=r"unknown metric 'pair' \(did you mean pairs\?\)"):
        get_registry().get_metric("pair")
    with pytest.raises(TrlPlusError, match=r"unknown scorer 'lenght' \(did you mean length\?\)"):
        get_registry().get_scorer("lenght")


def test_a_metric_registered_twice_names_both_plugins():
    from trl_plus import hookimpl
    from trl_plus.registry import load_registry

    class Twice:
        @hookimpl
        def register_metrics(self, register):
            from trl_plus.builtin.metrics import Pairs

            register(Pairs)

    registry = load_registry()
    with pytest.raises(TrlPlusError, match=r"metric 'pairs' is registered twice: by trl-plus \(built-in\) and by twice"):
        registry.add_plugin(Twice(), name="twice", source="twice")


class RefLogits(Metric):
    """DID-shaped: the policy's and the reference's logits at the scored positions."""

    name = "ref-logits-test"
    needs = Needs(reference="yes", scored_logits=True, teachers={"reference": "logits"})

    def batch(self, ctx):
        z = ctx.scored_logits() - ctx.frozen["reference"].logits  # [M, V]
        entropy = ctx.unscored(-(z.softmax(-1) * z.log_softmax(-1)).sum(-1))  # [K, B, T]
        return {"entropy": (entropy * ctx.mask).sum((0, 2)) / ctx.mask.sum((0, 2))}


def test_a_metric_reads_the_reference_logits_policy_equal_to_reference_gives_log_v(tmp_path):
    trainer = tiny_trainer("dpo", tmp_path, max_steps=1)
    result = run_metric(RefLogits(), trainer)
    vocab = trainer.model.config.vocab_size
    assert len(result.values["entropy"]) == 8 and result.values["index"][3].item() == 3
    assert result.summary["entropy"] == pytest.approx(torch.log(torch.tensor(float(vocab))).item(), abs=1e-5)


def test_pairs_metric_works_for_a_method_of_another_shape(tmp_path):
    """sft trains on K = 1 completions without a reference; the metric still sees pairs (K = 2)."""
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(8)]
    trainer = tiny_trainer("sft", tmp_path, max_steps=1, rows=rows)
    summary = run_metric(_pairs(), trainer).summary
    assert summary["pairs"] == 8 and "reward_accuracy" not in summary  # no reference in an sft run
    with pytest.raises(TrlPlusError, match=r"metrics: ref-logits-test: needs a reference, and method 'sft' trains "
                                           r"without one"):  # fmt: skip
        trainer.set_metrics([RefLogits()])


def _pairs():
    from trl_plus import get_registry

    return get_registry().get_metric("pairs")()


# -- through recipes: training, trl-plus eval, compare ---------------------------------------------------------


def recipe(tmp_path: Path, *, metrics: str = "[{name: pairs}]", eval_block: str | None = None, lora: bool = True,
           method: str = "dpo", steps: int = 2) -> Path:  # fmt: skip
    write_jsonl(preference_rows(16, seed=1), tmp_path / "train.jsonl")
    write_jsonl(preference_rows(6, seed=2), tmp_path / "eval.jsonl")
    text = f"""
method: {method}
model: {{name_or_path: tiny-llama, dtype: float32{', lora: {r: 4, alpha: 8}' if lora else ''}}}
data:
  train: {{path: train.jsonl}}
  eval: {eval_block or '{path: eval.jsonl}'}
metrics: {metrics}
training: {{output_dir: {tmp_path / 'run'}, max_steps: {steps}, learning_rate: 5.0e-3, per_device_train_batch_size: 4,
  per_device_eval_batch_size: 4, eval_steps: {steps}, save_steps: {steps}, logging_steps: 1, report_to: none,
  activation_checkpointing: false, disable_tqdm: true, seed: 0}}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_metric_during_training_equals_trl_plus_eval_on_the_checkpoint_and_pairs_reproduces_eval_report(tmp_path):
    from trl_plus.run.metrics import evaluate_metrics
    from trl_plus.run.train import train

    result = train(recipe(tmp_path))
    run = Path(result.output_dir)
    logged = next(e for e in result_state(run) if "eval_pairs/reward_margin" in e)
    assert logged["step"] == 2
    later = evaluate_metrics(run / "checkpoint-2", ["pairs"])["eval"]["pairs"].summary
    for key in ("reward_margin", "reward_accuracy", "likelihood_accuracy", "log_ratio", "logps/chosen"):
        assert later[key] == pytest.approx(logged[f"eval_pairs/{key}"], abs=1e-6), key
    # today's table (eval_report.json: the model before training as the reference) is the pairs metric's figures,
    # up to float32 summation order (another code path): a few float32 ulps of the log-probs (~ -90 here)
    report = json.loads((run / "eval_report.json").read_text())
    tol = 8 * torch.finfo(torch.float32).eps * abs(report["after"]["logps/chosen"])
    final = json.loads((run / "metrics_report.json").read_text())["eval"]["pairs"]["summary"]
    for key in ("reward_margin", "reward_accuracy", "likelihood_accuracy", "normalized_likelihood_accuracy",
                "logps/chosen", "logps/rejected", "log_ratio"):
        assert final[key] == pytest.approx(report["after"][key], abs=tol), key
    assert final["pairs"] == report["lengths"]["pairs"] and final["chosen_tokens"] == report["lengths"]["chosen_tokens"]
    assert final["reward_margin"] != 0.0  # it trained: the figures are not the untrained ties


def result_state(run: Path) -> list[dict]:
    return json.loads((run / "trainer_state.json").read_text())["log_history"]


def test_named_eval_sets_are_each_measured_and_logged_apart(tmp_path):
    from trl_plus.run.train import train

    write_jsonl(preference_rows(4, seed=3), tmp_path / "shifted.jsonl")
    path = recipe(tmp_path, eval_block="{in_domain: {path: eval.jsonl}, shifted: {path: shifted.jsonl}}", steps=1)
    result = train(path)
    entry = next(e for e in result_state(Path(result.output_dir)) if "eval_in_domain_pairs/pairs" in e)
    assert entry["eval_in_domain_pairs/pairs"] == 6 and entry["eval_shifted_pairs/pairs"] == 4


def test_bad_metrics_are_one_line_errors_before_any_model_loads(tmp_path, monkeypatch):
    from trl_plus.config import load_recipe
    from trl_plus.run.validate import check_recipe
    from trl_plus.testing import forbid_model_loading

    forbid_model_loading(monkeypatch)
    with pytest.raises(TrlPlusError, match=r"recipe.yaml: metrics.0.name: unknown metric 'pair' \(did you mean "
                                           r"pairs\?\)"):  # fmt: skip
        check_recipe(load_recipe(recipe(tmp_path, metrics="[{name: pair}]")))
    with pytest.raises(TrlPlusError, match=r"metrics.0.args.beta: Input should be greater than 0"):
        check_recipe(load_recipe(recipe(tmp_path, metrics="[{name: pairs, args: {beta: -1}}]")))
    with pytest.raises(TrlPlusError, match=r"data.eval: expected one data source \(with a path\) or named sets"):
        load_recipe(recipe(tmp_path, eval_block="{in_domain: eval.jsonl}"))


def test_a_metric_the_run_cannot_serve_is_refused_in_one_line(tmp_path):
    """Full fine-tuning with a precomputed reference has the reference's log-probs of the training data only."""
    trainer = tiny_trainer("dpo", tmp_path, max_steps=1, reference_mode="precomputed")
    with pytest.raises(TrlPlusError, match=r"metrics: ref-logits-test: needs the reference on its own data.*"
                                           r"reference.mode: model"):  # fmt: skip
        trainer.set_metrics([RefLogits()])


def test_eval_metric_cli_prints_and_writes_json(tmp_path, capsys):
    from trl_plus.run.train import train

    run = Path(train(recipe(tmp_path, metrics="[]", steps=1)).output_dir)
    capsys.readouterr()
    assert cli("eval", str(run), "--metric", "pairs", "--json", str(tmp_path / "m.json")) == 0
    out = capsys.readouterr().out
    assert "pairs on eval:" in out and "reward_accuracy" in out
    assert json.loads((tmp_path / "m.json").read_text())["eval"]["pairs"]["summary"]["pairs"] == 6
    assert cli("eval", str(run), "--metric", "pairs", "--data", "train", "--limit", "5") == 0
    assert "pairs on train:" in capsys.readouterr().out
    assert cli("eval", str(run), "--metric", "pear") == 2
    assert "--metric pear: unknown metric 'pear' (did you mean pairs?)" in capsys.readouterr().err


# -- score -------------------------------------------------------------------------------------------------------


def test_score_writes_columns_and_appends_lists(tmp_path, capsys):
    data = write_jsonl([{"prompt": "Hi ", "chosen": "a b c", "rejected": "de"}], tmp_path / "d.jsonl")
    out = tmp_path / "scored.jsonl"
    assert cli("score", data, "--scorer", "length:unit=words", "--out", str(out)) == 0
    row = json.loads(out.read_text())
    assert row["chosen_length"] == 3 and row["rejected_length"] == 1
    assert cli("score", str(out), "--scorer", "length:unit=characters,scale=-1", "--out", str(out),
               "--column", "margin_rewards", "--list") == 0  # fmt: skip
    assert cli("score", str(out), "--scorer", "length:unit=words", "--out", str(out), "--column", "margin_rewards",
               "--list") == 0  # fmt: skip
    row = json.loads(out.read_text())
    assert row["chosen_margin_rewards"] == [-5.0, 3.0] and row["rejected_margin_rewards"] == [-2.0, 1.0]
    capsys.readouterr()
    assert cli("score", data, "--scorer", "length", "--out", str(out)) == 2
    assert "--scorer length: unit tokens needs the run's tokenizer (--model)" in capsys.readouterr().err
    assert cli("score", data, "--scorer", "length:unit=bytes", "--out", str(out)) == 2
    assert "--scorer length: unit: Input should be 'tokens', 'characters' or 'words'" in capsys.readouterr().err


def test_token_length_counts_what_the_trainer_scores(tmp_path):
    """unit tokens = the completion's tokens as TRL tokenizes it (EOS included) = the trainer's ctx.lengths."""
    from trl_plus.run.score import build_scorer
    from trl_plus.testing import build_tokenizer

    rows = preference_rows(4)
    tokenizer = build_tokenizer()
    scores = build_scorer("length", tokenizer).score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    trainer = tiny_trainer("dpo", tmp_path, max_steps=1)
    lengths = torch.stack(run_metric(_pairs(), trainer, rows).values["lengths"])[:, 0]
    assert scores[:, 0].tolist() == lengths.tolist()


def test_implicit_reward_scorer_is_beta_times_the_adapters_log_ratio(tmp_path):
    from trl_plus.builtin.scorers import ModelScorerConfig, _sequence_logps, adapter_model
    from trl_plus.models.load import resolve_model_path
    from trl_plus.run.score import build_scorer
    from trl_plus.testing import build_tokenizer, save_tiny_adapter

    base = resolve_model_path("tiny-llama")
    adapter = save_tiny_adapter(base, tmp_path / "adapter")
    tokenizer = build_tokenizer()
    rows = preference_rows(3)
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    scores = build_scorer(f"implicit-reward:adapter={adapter},beta=0.5", tokenizer).score(prompts, completions)
    model = adapter_model(adapter)
    config = ModelScorerConfig()
    with_adapter = _sequence_logps(model, tokenizer, prompts, completions, config)
    with model.disable_adapter():
        base_logps = _sequence_logps(model, tokenizer, prompts, completions, config)
    assert torch.allclose(scores[:, 0], 0.5 * (with_adapter - base_logps), atol=1e-9)
    assert scores.abs().min() > 0  # a non-zero adapter moves every completion's log-prob


# -- compare and list --by ------------------------------------------------------------------------------------------


def test_compare_of_runs_on_different_data_is_refused(tmp_path, capsys):
    runs = []
    for name, limit in (("a", None), ("b", 3)):
        folder = tmp_path / name
        folder.mkdir()
        path = recipe(folder, metrics="[]", lora=True, steps=1)
        if limit:
            text = yaml.safe_load(path.read_text())
            text["data"]["eval"]["limit"] = limit
            path.write_text(yaml.safe_dump(text))
        assert cli("train", str(path)) == 0
        runs.append(str(folder / "run"))
    capsys.readouterr()
    assert cli("compare", *runs) == 2
    assert "the runs were evaluated on different data" in capsys.readouterr().err
    assert cli("compare", *runs, "--data", str(tmp_path / "a" / "eval.jsonl"), "--png", str(tmp_path / "c.png")) == 0
    out = capsys.readouterr().out
    assert "KL proxy: mean log πθ/πref" in out and (tmp_path / "c.png").stat().st_size > 10_000


def test_list_by_groups_methods_by_a_taxonomy_key(capsys):
    assert cli("list", "--by", "constraint.reference") == 0
    out = capsys.readouterr().out
    assert "fixed" in out or "not tagged under constraint.reference" in out
    assert cli("list", "--by", "constraint.ref") == 2
    assert "not a taxonomy key (did you mean constraint.reference?)" in capsys.readouterr().err
    assert cli("list", "--metrics") == 0 and "pairs" in capsys.readouterr().out


def test_modpo_on_score_columns_is_modpo_on_hand_written_columns(tmp_path):
    pytest.importorskip("trl_plus_modpo")  # a plugin of the repository (CI installs every one)
    rows = preference_rows(4, seed=4)
    hand = [{**r, "chosen_margin_rewards": [-float(len(r["chosen"].split()))],
             "rejected_margin_rewards": [-float(len(r["rejected"].split()))]} for r in rows]  # fmt: skip
    source = write_jsonl(rows, tmp_path / "pairs.jsonl")
    scored = tmp_path / "scored.jsonl"
    assert cli("score", source, "--scorer", "length:unit=words,scale=-1", "--column", "margin_rewards", "--list",
               "--out", str(scored)) == 0  # fmt: skip
    produced = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [p["chosen_margin_rewards"] for p in produced] == [h["chosen_margin_rewards"] for h in hand]
    logs = {}
    for name, data in (("hand", hand), ("scored", produced)):
        trainer = tiny_trainer("modpo", tmp_path / name, {"beta": 0.1, "w": [0.5, 0.5]}, rows=data, max_steps=2)
        trainer.train()
        logs[name] = [value for e in training_logs(trainer) for value in (e["loss"], e["rewards/margins"])]
    assert logs["scored"] == pytest.approx(logs["hand"], abs=1e-7)
    assert len(logs["hand"]) == 4


def test_compare_a_dpo_and_a_simpo_run_reproduces_each_report(tmp_path, capsys):
    pytest.importorskip("trl_plus_simpo")  # a plugin of the repository (CI installs every one)
    write_jsonl(preference_rows(4, seed=1), tmp_path / "train.jsonl")
    write_jsonl(preference_rows(3, seed=2), tmp_path / "eval.jsonl")
    (tmp_path / "recipe.yaml").write_text("""
method: dpo
model: {name_or_path: tiny-llama, dtype: float32, lora: {r: 4, alpha: 8}}
data: {train: {path: train.jsonl}, eval: {path: eval.jsonl}}
training: {max_steps: 1, learning_rate: 5.0e-3, per_device_train_batch_size: 4, per_device_eval_batch_size: 4,
  eval_strategy: "no", save_strategy: "no", logging_steps: 1, activation_checkpointing: false, disable_tqdm: true,
  seed: 0}
""")
    out = tmp_path / "runs"
    assert cli("compare", str(tmp_path / "recipe.yaml"), "--methods", "dpo,simpo", "--out", str(out)) == 0
    table = capsys.readouterr().out
    from trl_plus.run.compare import compare_runs

    comparison = compare_runs([str(out / "dpo"), str(out / "simpo")])
    for label, run in (("dpo β=0.1", "dpo"), ("simpo", "simpo")):
        label = next(name for name in comparison.reports if name.startswith(label.split()[0]))
        own = json.loads((out / run / "eval_report.json").read_text())["after"]
        tol = 8 * torch.finfo(torch.float32).eps * abs(own["logps/chosen"])  # float32 sums, another batch order
        for key in ("reward_accuracy", "reward_margin", "likelihood_accuracy", "log_ratio"):
            assert comparison.reports[label].after[key] == pytest.approx(own[key], abs=tol), (run, key)
    assert "KL proxy" in table and (Path(out).parent / "compare.png").is_file()
