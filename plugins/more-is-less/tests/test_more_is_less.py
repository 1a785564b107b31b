"""More-is-Less: the card's worked examples (mean-difference and logistic probes), ‖d‖ = 0, the invariances, folds
grouped by prompt, and the metric through the real trainer on pooled completion-token hidden states."""

from __future__ import annotations

import csv

import pytest
import torch
from trl_plus_more_is_less import (
    MoreIsLess,
    MoreIsLessConfig,
    auc,
    cross_validate,
    logistic_probe,
    mean_difference,
    mean_difference_accuracy,
    probe_accuracy,
    prompt_folds,
)

from trl_plus import PlusTrainer, TrlPlusError, tokenize_completions  # noqa: F401 (the trainer's import at collection)
from trl_plus.testing import preference_rows, run_metric, tiny_trainer

# The card's worked examples (shared/methods/more-is-less.md): 2-D toy features, train accuracy.
SEPARABLE = ([[2, 1], [3, 2], [2.5, 0.5]], [[-1, 0], [-2, 1], [0, -1]])
OVERLAPPING = ([[1, 0], [2, 1], [0, 1], [-1, 0]], [[0, 0], [1, -1], [-1, -1], [2, 0]])


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def fit(chosen, rejected):
    """The card's logistic probe (2,000 steps, lr 0.1, L2 1e-3, zero init) and its train accuracy."""
    chosen, rejected = t(chosen), t(rejected)
    x = torch.cat([chosen, rejected])
    y = torch.cat([torch.ones(len(chosen)), torch.zeros(len(rejected))])
    w, b, loss = logistic_probe(x, y, steps=2000, lr=0.1, l2=1e-3)
    return probe_accuracy(chosen @ w + b, rejected @ w + b), loss


@pytest.mark.parametrize("case, d, mean_diff, logistic, loss", [
    (SEPARABLE, [3.5, 1.166667], 1.0, 1.0, 0.0169825),
    (OVERLAPPING, [0.0, 1.0], 0.5, 0.75, 0.325996),
])  # fmt: skip
def test_the_cards_worked_examples(case, d, mean_diff, logistic, loss):
    chosen, rejected = case
    assert torch.allclose(mean_difference(t(chosen), t(rejected))[0], t(d), atol=1e-6, rtol=0)
    assert mean_difference_accuracy(t(chosen), t(rejected)) == mean_diff
    accuracy, final_loss = fit(chosen, rejected)
    assert accuracy == logistic
    assert final_loss == pytest.approx(loss, abs=1e-6)


def test_identical_feature_sets_give_one_half():
    features = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mean_difference_accuracy(features, features.clone()) == 0.5  # ‖d‖ = 0 (the tie rule alone: 0.0)
    config = MoreIsLessConfig(k_folds=3, steps=200)
    result = cross_validate(features, features.clone(), [0, 0, 1, 1, 2, 2], config)
    assert result["accuracy"] == 0.5 and result["auc"] == 0.5 and result["mean_difference_accuracy"] == 0.5


def test_mean_difference_is_invariant_to_shift_scale_and_label_swap():
    generator = torch.Generator().manual_seed(1)
    chosen = torch.randn(20, 5, generator=generator, dtype=torch.float64) + 0.3
    rejected = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    accuracy = mean_difference_accuracy(chosen, rejected)
    assert 0.5 < accuracy < 1.0
    shift = torch.randn(5, generator=generator, dtype=torch.float64)
    assert mean_difference_accuracy(chosen + shift, rejected + shift) == accuracy
    assert mean_difference_accuracy(3.7 * chosen, 3.7 * rejected) == accuracy
    assert mean_difference_accuracy(rejected, chosen) == accuracy


def test_auc_counts_ties_one_half():
    assert auc(t([2.0, 1.0]), t([0.0, 1.0])) == 0.875
    assert auc(t([1.0]), t([1.0])) == 0.5


def test_folds_never_split_a_prompt():
    prompts = ["a", "b", "a", "c", "d", "b", "e", "a", [{"role": "user", "content": "f"}]]
    folds = prompt_folds(prompts, k=3, seed=0)
    by_prompt = {}
    for prompt, fold in zip(map(str, prompts), folds):
        by_prompt.setdefault(prompt, set()).add(fold)
    assert all(len(f) == 1 for f in by_prompt.values())
    assert sorted(set(folds)) == [0, 1, 2]
    assert sorted(set(prompt_folds(["x", "y", "x"], k=5))) == [0, 1]  # k capped at the number of prompts
    with pytest.raises(TrlPlusError, match="2 distinct prompts"):
        prompt_folds(["x", "x"], k=5)


def test_the_metric_on_the_tiny_trainer(tmp_path):
    base = preference_rows(5, seed=4)
    # 8 pairs over 5 prompts: three prompts have two pairs each (their folds must hold both)
    rows = base + [{**base[i], "chosen": base[j]["chosen"]} for i, j in ((0, 1), (2, 3), (4, 0))]
    trainer = tiny_trainer("dpo", tmp_path / "run", rows=rows)
    metric = MoreIsLess(k_folds=3, steps=300)
    assert metric.split == "train"
    result = run_metric(metric, trainer, rows, tmp_path / "out")
    summary = result.summary
    assert summary["pairs"] == 8 and summary["folds"] == 3
    for key in ("probe_accuracy", "probe_auc", "mean_difference_accuracy", "mean_difference_accuracy/in_sample"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["separable"] == float(summary["probe_accuracy"] >= 0.9)

    # the features: the mean of the last hidden states at the chosen completion's tokens (EOS included)
    ids = tokenize_completions(trainer.processing_class, rows[0]["prompt"], {"y": rows[0]["chosen"]})
    model = trainer.model.eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids["prompt_ids"] + ids["y"]]), output_hidden_states=True).hidden_states[-1]
    expected = hidden[0, len(ids["prompt_ids"]) :].double().mean(0)
    assert torch.allclose(result.values["chosen"][0], expected, atol=1e-5, rtol=0)

    [path] = result.artefacts
    with open(path) as handle:
        table = list(csv.DictReader(handle))
    folds = {}
    for row in table:
        folds.setdefault(rows[int(row["index"])]["prompt"], set()).add(int(row["fold"]))
    assert len(folds) == 5 and all(len(f) == 1 for f in folds.values())  # no prompt split across folds


def test_a_multi_source_like_set_is_flagged_and_a_label_shuffled_one_is_not(tmp_path):
    # the synthetic pairs are a helpful answer vs a canned refusal (two sources, as the paper's multi-model data);
    # swapping chosen and rejected in a random half of the pairs makes the two sides one mixture
    rows = preference_rows(16, seed=1)
    swapped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i % 2 else r for i, r in enumerate(rows)]
    trainer = tiny_trainer("dpo", tmp_path / "run", rows=rows)
    two_sources = run_metric(MoreIsLess(k_folds=4, steps=500), trainer, rows).summary
    mixed = run_metric(MoreIsLess(k_folds=4, steps=500), trainer, swapped).summary
    assert two_sources["separable"] == 1.0 and two_sources["probe_accuracy"] >= 0.9
    assert mixed["separable"] == 0.0 and mixed["probe_accuracy"] < two_sources["probe_accuracy"]


def test_a_layer_outside_the_model_is_one_line(tmp_path):
    trainer = tiny_trainer("dpo", tmp_path / "run", rows=preference_rows(4))
    with pytest.raises(TrlPlusError, match="layer 9 is outside the model's 3 hidden states"):
        run_metric(MoreIsLess(layer=9), trainer, preference_rows(4))


def test_pairs_cut_to_no_completion_token_are_left_out(tmp_path):
    rows = preference_rows(6, seed=2)
    rows[1] = {**rows[1], "prompt": "x" * 200}  # max_length 64 keeps none of its completions' tokens
    trainer = tiny_trainer("dpo", tmp_path / "run", rows=rows, training={"max_length": 64})
    result = run_metric(MoreIsLess(k_folds=2, steps=50), trainer, rows, tmp_path / "out")
    assert result.summary["pairs"] == 5
    with open(result.artefacts[0]) as handle:
        assert [int(r["index"]) for r in csv.DictReader(handle)] == [0, 2, 3, 4, 5]
