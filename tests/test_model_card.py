"""A run's README.md is a Hub model card for its method: front matter (base model, tags with the method, held-out
results), the method and its own paper, the resolved recipe and the held-out before/after table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import trl_plus

FAST = ["training.max_steps=2", "training.disable_tqdm=true", "training.save_strategy='no'",
        "training.eval_strategy='no'"]  # fmt: skip


def front_matter_and_body(card: Path) -> tuple[dict, str]:
    """The card's YAML front matter (parsed) and its Markdown."""
    _, front, body = card.read_text().split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-card")
    return trl_plus.train("recipes/quickstart-tiny.yaml", [*FAST, f"training.output_dir={out}", "data.eval.limit=8"])


def test_the_card_names_the_method_its_paper_and_the_base_model(dpo_run):
    meta, body = front_matter_and_body(Path(dpo_run.output_dir) / "README.md")
    assert meta["base_model"] == "tiny-llama"
    assert {"trl", "trl-plus", "dpo"} <= set(meta["tags"])
    assert "## Method" in body and "**`dpo`**" in body
    assert "https://arxiv.org/abs/2305.18290" in body
    assert "Direct Preference Optimization: Your Language Model is Secretly a Reward Model" in body
    assert "github.com/eric-mitchell/direct-preference-optimization" in body  # the official code
    assert "None" not in body


def test_the_card_holds_the_recipe_and_the_held_out_figures(dpo_run):
    out = Path(dpo_run.output_dir)
    meta, body = front_matter_and_body(out / "README.md")
    recipe = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe) == yaml.safe_load((out / "trl_plus_recipe.yaml").read_text())
    assert "beta: 0.1" in recipe and "loss_type: sigmoid" in recipe  # method_args, the defaults written out
    report = json.loads((out / "eval_report.json").read_text())
    row = next(line for line in body.splitlines() if line.startswith("| implicit-reward accuracy |"))
    assert row == f"| implicit-reward accuracy | {report['before']['reward_accuracy']:.3f} | " \
                  f"{report['after']['reward_accuracy']:.3f} |"  # fmt: skip
    results = meta["model-index"][0]["results"][0]
    metrics = {m["type"]: m["value"] for m in results["metrics"]}
    assert metrics["reward_accuracy"] == pytest.approx(report["after"]["reward_accuracy"])
    assert metrics["reward_margin"] == pytest.approx(report["after"]["reward_margin"])


def test_a_plugin_method_is_credited_with_its_own_paper_not_dpos(tmp_path):
    overrides = [*FAST, "method=sft", "method_args={}", "data.train.columns.completion=chosen", "data.eval=null",
                 f"training.output_dir={tmp_path}", "model.lora={r: 4}"]  # fmt: skip
    trl_plus.train("recipes/quickstart-tiny.yaml", overrides)
    meta, body = front_matter_and_body(tmp_path / "README.md")
    assert "sft" in meta["tags"] and "dpo" not in meta["tags"]  # also after PEFT's save rewrote the tags
    assert meta["base_model"] == "tiny-llama"
    assert "https://arxiv.org/abs/2203.02155" in body and "huggingface.co/papers/2203.02155" in body
    assert "2305.18290" not in body and "Direct Preference Optimization" not in body
    assert "## Held-out evaluation" not in body and "model-index" not in meta  # no data.eval
