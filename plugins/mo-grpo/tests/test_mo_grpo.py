"""MO-GRPO: the card's worked example through TRL's own GRPOTrainer path (four head functions from one vector scorer:
equal weights, the card's weights, GDPO's normalize_then_sum), the card's invariances, one-hot weights = GRPO on
that head, one scorer forward per generation batch for all heads (spy), config errors, the generation-side reward
rising on a weighted (digits, vowels) vector reward, and the recipe validating."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from pydantic import ValidationError
from trl import GRPOConfig
from trl_plus_mo_grpo import MOGRPO, MOGRPOConfig

from trl_plus import GRPO, PlusGRPOTrainer, Rollout, Scorer, TrlPlusError
from trl_plus.testing import build_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[3]

# The card: one group of G = 4, heads [polite, meaningful, actionable, safe].
F = [[0.9, 0.8, 0.7, 1.0], [0.5, 0.6, 0.4, 0.2], [0.7, 0.9, 0.9, 0.9], [0.3, 0.2, 0.1, 0.0]]


class Heads(Scorer):
    """A K-head scorer returning a fixed score table (row i for the batch's completion i); counts its calls."""

    name = "heads"
    outputs = ("polite", "meaningful", "actionable", "safe")
    table = torch.tensor(F, dtype=torch.float64)
    calls = 0

    def score(self, prompts, completions, **columns):
        type(self).calls += 1
        return self.table[: len(completions)]


class Safe(Heads):
    """The ``safe`` head alone (for one-hot weights = single-objective GRPO)."""

    name = "safe"
    outputs = ("safe",)

    def score(self, prompts, completions, **columns):
        return Heads.table[: len(completions), 3:]


class DigitsVowels(Scorer):
    """A 2-head rule scorer (number of digits, number of vowels) in one call; counts its calls."""

    name = "digits-vowels"
    outputs = ("digits", "vowels")
    calls = 0

    def score(self, prompts, completions, **columns):
        type(self).calls += 1
        return torch.tensor([[sum(ch.isdigit() for ch in c), sum(ch in "aeiouAEIOU" for ch in c)]
                             for c in completions], dtype=torch.float64)  # fmt: skip


def grpo_args(tmp_path, **kwargs) -> GRPOConfig:
    defaults = {"output_dir": str(tmp_path), "max_steps": 1, "learning_rate": 1e-2, "per_device_train_batch_size": 4,
                "num_generations": 4, "logging_steps": 1, "report_to": "none", "save_strategy": "no", "bf16": False,
                "disable_tqdm": True, "seed": 0, "use_cpu": True, "activation_checkpointing": False,
                "dataloader_pin_memory": False}  # fmt: skip
    return GRPOConfig(**{**defaults, **kwargs})


def trainer(tmp_path, method=MOGRPO, method_args=None, scorers=None, rows=4, n=4, new_tokens=4, **kwargs):
    tok = build_tokenizer()
    return PlusGRPOTrainer(
        build_model(tok), method=method, method_args=method_args, args=grpo_args(tmp_path, **kwargs),
        train_dataset=Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(rows)]), processing_class=tok,
        scorers=scorers or [(Heads(), 1.0)], rollout=Rollout(n=n, decoding={"max_new_tokens": new_tokens}),
    )  # fmt: skip


def advantages(t, table) -> list[float]:
    """TRL's advantages (its ``_generate_and_score_completions``: generation, reward functions, aggregation) of one
    group of 4 whose head scores are ``table``."""
    Heads.table = torch.as_tensor(table, dtype=torch.float64)
    out = t._generate_and_score_completions([{"prompt": "Count to 1:"}] * 4)
    return out["advantages"].tolist()


@pytest.fixture(scope="module")
def equal(tmp_path_factory):
    return trainer(tmp_path_factory.mktemp("equal"))


def test_card_worked_example_through_trls_path(equal, tmp_path):
    assert equal.args.multi_objective_aggregation == "sum_then_normalize"
    assert equal.reward_weights.tolist() == [0.25] * 4 and equal.reward_func_names == [
        "heads/polite", "heads/meaningful", "heads/actionable", "heads/safe"]  # fmt: skip
    assert advantages(equal, F) == pytest.approx([0.818259, -0.418222, 0.818259, -1.218297], abs=1e-6)
    assert equal._metrics["train"]["reward"][-1] == pytest.approx((0.85 + 0.425 + 0.85 + 0.15) / 4, abs=1e-6)
    weighted = trainer(tmp_path / "w", method_args={"weights": [0.1, 0.2, 0.2, 0.5]})
    assert weighted.reward_weights.tolist() == pytest.approx([0.1, 0.2, 0.2, 0.5])
    assert advantages(weighted, F) == pytest.approx([0.847008, -0.508205, 0.821912, -1.160715], abs=1e-6)
    assert weighted._metrics["train"]["reward"][-1] == pytest.approx((0.89 + 0.35 + 0.88 + 0.09) / 4, abs=1e-6)
    gdpo = trainer(tmp_path / "g", method_args={"aggregation": "normalize_then_sum"})
    assert gdpo.args.multi_objective_aggregation == "normalize_then_sum"
    assert advantages(gdpo, F) == pytest.approx([0.821295, -0.381435, 0.800516, -1.240377], abs=1e-6)


def test_the_cards_invariances(equal):
    base = torch.tensor(advantages(equal, F))
    assert base.sum().item() == pytest.approx(0.0, abs=1e-6)  # a group's advantages sum to 0
    shifted = torch.tensor(F) + torch.tensor([0.3, -1.0, 2.0, 0.5])  # a constant per head
    assert advantages(equal, shifted) == pytest.approx(base.tolist(), abs=1e-6)
    # every head × c: unchanged but for the 1e-4 in (std + 1e-4): std_R = 0.355 → relative change 1e-4·(1 − 1/c)/0.355
    assert advantages(equal, 3.0 * torch.tensor(F)) == pytest.approx(base.tolist(), rel=2e-4)
    perm = [2, 0, 3, 1]
    assert advantages(equal, [F[i] for i in perm]) == pytest.approx(base[perm].tolist(), abs=1e-6)
    tied = [[0.9, 0.1, 0.5, 0.5], [0.1, 0.9, 0.5, 0.5], [0.5, 0.5, 0.9, 0.1], [0.5, 0.5, 0.1, 0.9]]  # same mean
    assert advantages(equal, tied) == [0.0] * 4


def test_one_hot_weights_are_grpo_on_that_head(tmp_path):
    one_hot = trainer(tmp_path / "mo", method_args={"weights": [0.0, 0.0, 0.0, 1.0]})
    grpo = trainer(tmp_path / "grpo", method=GRPO, scorers=[(Safe(), 1.0)])
    expected = advantages(grpo, F)
    assert expected == pytest.approx([0.951397, -0.650956, 0.751103, -1.051544], abs=1e-6)  # safe = [1, .2, .9, 0]
    assert advantages(one_hot, F) == pytest.approx(expected, abs=1e-7)


def test_config_errors(tmp_path):
    assert MOGRPO().config.model_dump() == {"weights": None, "aggregation": "sum_then_normalize", "beta": 0.0}
    for bad in ({"aggregation": "mean"}, {"beta": -0.1}, {"weights": []}, {"wieghts": [1.0]}):
        with pytest.raises(ValidationError):
            MOGRPO(**bad)
    with pytest.raises(TrlPlusError, match=r"^method_args.weights: 3 weight\(s\) for 4 reward function\(s\)"):
        trainer(tmp_path, method_args={"weights": [1.0, 1.0, 1.0]})
    with pytest.raises(TrlPlusError, match="contradicts method_args.aggregation 'sum_then_normalize'"):
        trainer(tmp_path, multi_objective_aggregation="normalize_then_sum")


def test_learns_a_weighted_vector_reward_with_one_scorer_call_per_generation_batch(tmp_path):
    """Weighted (digits, vowels) from one 2-head scorer; full fine-tuning, 20 steps of 8 completions (n 4)."""
    DigitsVowels.calls = 0
    t = trainer(tmp_path, method_args={"weights": [0.8, 0.2]}, scorers=[(DigitsVowels(), 1.0)], rows=32,
                new_tokens=16, max_steps=20, per_device_train_batch_size=8, temperature=1.0)  # fmt: skip
    assert t.reward_weights.tolist() == pytest.approx([0.8, 0.2])
    t.train()
    logs = t.state.log_history
    curve = [e["rollout/reward"] for e in logs if "rollout/reward" in e]
    assert len(curve) == 20 and DigitsVowels.calls == 20  # two reward functions, one score() per generation batch
    digits = [e["rewards/digits-vowels/digits/mean"] for e in logs if "rewards/digits-vowels/digits/mean" in e]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    print(f"rollout/reward {first:.3f} -> {last:.3f}; digits {digits[0]:.2f} -> {digits[-1]:.2f}")
    assert last - first > 2.4, (first, last)  # measured 1.97 -> 6.81 (+4.8)


def test_the_recipe_validates(monkeypatch):
    from trl_plus import check_recipe, load_recipe

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/mo-grpo.yaml").read_text())
    assert recipe["method"] == "mo-grpo" and len(recipe["rollout"]["scorers"]) == 2
    MOGRPOConfig(**recipe["method_args"])
    check_recipe(load_recipe("recipes/mo-grpo.yaml"))  # (the plugin is installed: registered by its entry point)
