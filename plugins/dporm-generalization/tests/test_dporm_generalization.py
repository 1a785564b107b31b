"""dporm-generalization: the card's worked example, the strict convention (policy == reference gives 0), DPORM
accuracy equal to the trainer's own eval `rewards/accuracies`, and EXRM accuracy from a tiny reward model folder."""

from __future__ import annotations

import csv

import pytest
import torch
from datasets import Dataset
from trl_plus_dporm_generalization import DPORMGeneralization, strict_accuracy

from trl_plus import get_registry
from trl_plus.testing import build_tokenizer, make_context, preference_rows, tiny_trainer

# The card's worked example: ℓθ(y_w), ℓθ(y_l), ℓref(y_w), ℓref(y_l) per pair; EXRM scores (chosen, rejected).
CARD = [(-19.0, -18.5, -20.0, -18.0), (-29.0, -36.0, -30.0, -35.0), (-12.0, -12.2, -12.5, -12.0)]
CARD_EXRM = [(0.3, 0.9), (1.2, -0.4), (0.1, 0.1)]


def summarize(metric, ctx):
    values = {key: list(value) for key, value in metric.batch(ctx).items()}
    values["index"] = [torch.tensor(i) for i in range(ctx.batch_size)]
    return metric.summarize(values), values


def card_context():
    policy = [[[p[0]] for p in CARD], [[p[1]] for p in CARD]]
    ref = [[[p[2]] for p in CARD], [[p[3]] for p in CARD]]
    return make_context(policy, ref, requires_grad=False)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_card_worked_example_dporm(beta):
    summary, values = summarize(DPORMGeneralization(beta=beta), card_context())
    margins = [(r[0] - r[1]).item() / beta for r in values["rewards"]]
    assert margins == pytest.approx([1.5, 2.0, 0.7], abs=1e-12)
    assert summary["dporm_accuracy"] == 1.0 and summary["dporm_ties"] == 0.0  # β only scales
    assert "exrm_accuracy" not in summary


def test_card_worked_example_exrm():
    scores = torch.tensor(CARD_EXRM, dtype=torch.float64)
    accuracy, ties = strict_accuracy(scores[:, 0], scores[:, 1])
    assert accuracy == pytest.approx(0.333333, abs=1e-6)  # the third pair is a tie, counted wrong
    assert ties == pytest.approx(1 / 3, abs=1e-12)


def test_invariant_to_a_per_prompt_constant_and_swap_gives_one_minus_a_minus_ties():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(-3, 4, (500, 2), generator=generator).double()
    a, ties = strict_accuracy(rewards[:, 0], rewards[:, 1])
    shifted = rewards + torch.randn(500, 1, generator=generator, dtype=torch.float64).round()
    assert strict_accuracy(shifted[:, 0], shifted[:, 1])[0] == a
    assert strict_accuracy(rewards[:, 1], rewards[:, 0])[0] == pytest.approx(1 - a - ties, abs=1e-12)


def tiny_reward_model(directory, seed=0):
    """A random 1-layer Llama sequence classifier (one label) over the tiny character tokenizer, saved as a folder."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


SETS = {"id": preference_rows(8, seed=2), "shift": preference_rows(8, seed=3)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny DPO trainer with two named eval sets (in-distribution vs shifted) and a tiny reward model: the metric
    and TRL's own eval loop on each set before training (policy == reference) and after 2 steps."""
    tmp = tmp_path_factory.mktemp("dporm")
    data = {name: Dataset.from_list(rows) for name, rows in SETS.items()}
    trainer = tiny_trainer("dpo", tmp / "run", max_steps=2, learning_rate=2e-2, eval_dataset=data,
                           training={"per_device_eval_batch_size": 8, "per_device_train_batch_size": 4})  # fmt: skip
    cls = get_registry().get_metric("dporm-generalization")
    out = {"rm": tiny_reward_model(tmp / "rm")}
    for when in ("before", "after"):
        if when == "after":
            trainer.train()
        metric = cls() if when == "before" else cls(reward_model=out["rm"], batch_size=3)  # EXRM: once is enough
        out[when] = trainer.run_metrics([metric], data, tmp / when)
        # TRL's eval loop, one named set at a time (its reward metrics are logged without the set's name)
        out[f"trl_{when}"] = {name: trainer.evaluate(eval_dataset=name) for name in SETS}
    return out


def test_policy_equal_to_reference_gives_zero_as_the_trainer_does(run):
    """Not trained: every implicit reward is 0, a tie, so strict DPORM accuracy is 0 (the ties-½ table says 0.5)."""
    for name in SETS:
        summary = run["before"][name]["dporm-generalization"].summary
        assert summary["dporm_accuracy"] == 0.0 and summary["dporm_ties"] == 1.0
        assert run["trl_before"][name]["eval_rewards/accuracies"] == 0.0


def test_dporm_accuracy_equals_the_trainers_strict_rewards_accuracies_per_named_set(run):
    """After a few DPO steps TRL's own eval `rewards/accuracies` (strict >) on each set equals the metric's DPORM
    accuracy on it (and the margins and chosen rewards agree); each named set is scored on its own."""
    for name in SETS:
        summary, trl = run["after"][name]["dporm-generalization"].summary, run["trl_after"][name]
        assert summary["dporm_accuracy"] == pytest.approx(trl["eval_rewards/accuracies"], abs=1e-6)
        assert summary["reward_margin"] == pytest.approx(trl["eval_rewards/margins"], abs=1e-5)
        assert summary["rewards/chosen"] == pytest.approx(trl["eval_rewards/chosen"], abs=1e-5)
    assert any(run["after"][n]["dporm-generalization"].summary["dporm_accuracy"] > 0 for n in SETS)


def test_exrm_accuracy_is_the_reward_models_own_ranking(run):
    """EXRM accuracy equals the reward model's scores of prompt + completion computed here one text at a time; it
    is what the reward model alone says, whatever the policy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run["rm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(run["rm"])
    for name, rows in SETS.items():
        with torch.no_grad():
            score = [[model(**tokenizer(row["prompt"] + row[side], return_tensors="pt")).logits[0, 0].item()
                      for side in ("chosen", "rejected")] for row in rows]  # fmt: skip
        expected = sum(c > r for c, r in score) / len(rows)
        result = run["after"][name]["dporm-generalization"]
        assert result.summary["exrm_accuracy"] == pytest.approx(expected, abs=1e-12)
        gap = result.summary["exrm_accuracy"] - result.summary["dporm_accuracy"]
        assert result.summary["accuracy_gap"] == pytest.approx(gap, abs=1e-12)
        assert "exrm_accuracy" not in run["before"][name]["dporm-generalization"].summary  # no reward model given
        table = list(csv.DictReader(run["after"][name]["dporm-generalization"].artefacts[0].open()))
        assert [int(r["index"]) for r in table] == list(range(len(rows)))
        assert [float(r["exrm_chosen"]) for r in table] == pytest.approx([s[0] for s in score], abs=1e-5)
    assert 0 < expected < 1  # a random reward model: some pairs right, some wrong
