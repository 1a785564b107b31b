"""The run's model card (``README.md`` in ``output_dir``) in the Hub's format: the trainer's card (TRL's, with the
method and its paper) completed with what only the run knows, the recipe and the held-out figures."""

from __future__ import annotations

import os
from pathlib import Path

from .evaluate import ROWS
from .rundir import MODEL_CARD

#: The held-out metrics that go into the card's ``model-index`` (the "after" column of the table).
INDEXED_METRICS = ("reward_accuracy", "reward_margin", "likelihood_accuracy")


def _insert(text: str, section: str, before: str) -> str:
    """``section`` placed before the first ``before`` heading of ``text`` (at the end when there is none)."""
    marker = f"\n{before}\n"
    if marker in text:
        return text.replace(marker, f"\n{section}\n{marker}", 1)
    return f"{text.rstrip()}\n\n{section}\n"


def complete_model_card(output_dir: str | Path, recipe, recipe_text: str, evaluation=None) -> Path | None:
    """Add the run's facts to the model card the trainer saved in ``output_dir``: the base model and the method in
    its front matter (PEFT's save rewrites both), the held-out before/after table (``evaluation``, an
    :class:`~trl_plus.run.evaluate.EvalReport`) also as ``model-index`` results, and the resolved recipe
    (``recipe_text``). Returns the card's path, or ``None`` when the run saved no card."""
    from huggingface_hub import EvalResult, ModelCard

    path = Path(output_dir) / MODEL_CARD
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    data = card.data
    name = recipe.model.name_or_path
    data.base_model = None if os.path.isdir(name) else name  # the hub knows hub ids, not this machine's folders
    data.tags = list(dict.fromkeys([*(data.tags or []), "trl", "trl-plus", recipe.method]))
    data.model_name = data.model_name or Path(output_dir).name
    text = card.text
    if evaluation is not None:
        text = _insert(text, f"## Held-out evaluation\n\n{evaluation.markdown()}\n", "## Quick start")
        if evaluation.after is not None:
            labels = {key: label.strip() for key, label, _ in ROWS}
            data.eval_results = [
                EvalResult(task_type="text-generation", dataset_type=evaluation.source, dataset_name=evaluation.source,
                           metric_type=key, metric_name=labels[key], metric_value=evaluation.after[key])  # fmt: skip
                for key in INDEXED_METRICS
                if key in evaluation.after
            ]
    recipe_section = f"### Recipe\n\n`trl-plus train` ran this resolved recipe:\n\n```yaml\n{recipe_text.rstrip()}\n```\n"
    card.text = _insert(text, recipe_section, "### Framework versions")
    card.save(path)
    return path
