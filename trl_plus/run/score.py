"""``trl-plus score FILE --scorer NAME[:key=value,...] --out FILE``: a frozen scorer run once over a data file, its
scores written as new columns (MODPO's margin rewards, a reward model's labels, lengths).

For each completion side the file has (``chosen``, ``rejected``; or ``completion``) the scorer's outputs become
columns ``<side>_<column>`` (``column``: ``--column``, else the scorer's output name); ``--list`` appends each
score to a list column instead (created when absent), so several scorers build MODPO's
``chosen_margin_rewards`` / ``rejected_margin_rewards`` lists one after the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..config import explain
from ..data.load import load_preferences
from ..errors import TrlPlusError
from ..models.load import load_tokenizer
from ..registry import get_registry

SIDES = ("chosen", "rejected", "completion")


def parse_scorer(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})`` (values read as YAML: numbers, booleans)."""
    name, _, rest = spec.partition(":")
    args = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TrlPlusError(f"--scorer {spec}: expected NAME or NAME:key=value[,key=value], got {item!r}")
        args[key.strip()] = yaml.safe_load(value)
    return name.strip(), args


def build_scorer(spec: str, tokenizer: Any = None, device: Any = None):
    """The scorer ``spec`` names, its arguments validated (one line each)."""
    name, args = parse_scorer(spec)
    cls = get_registry().get_scorer(name)
    try:
        return cls(cls.Config(**args), tokenizer=tokenizer, device=device)
    except ValidationError as exc:
        raise TrlPlusError(explain(exc, f"--scorer {name}", model=cls.Config)) from None


def score_file(path: str, scorer: str, out: str, *, model: str | None = None, column: str | None = None,
               as_list: bool = False, limit: int | None = None) -> tuple[str, list[str], int]:  # fmt: skip
    """Score every completion of the data file ``path`` with ``scorer`` and write the rows with the new columns
    to ``out`` (JSON lines). ``model`` gives the tokenizer (a name, alias or folder). Returns ``(out, the columns
    written, rows)``."""
    dataset = load_preferences(path, "train", limit, where=path)
    sides = [s for s in SIDES if s in dataset.column_names]
    if not sides:
        raise TrlPlusError(f"{path}: no completion column to score (expected chosen/rejected or completion; the file "
                           f"has {', '.join(dataset.column_names)})")  # fmt: skip
    tokenizer = load_tokenizer(model) if model else None
    instance = build_scorer(scorer, tokenizer)
    prompts = dataset["prompt"] if "prompt" in dataset.column_names else [""] * len(dataset)
    rows = [dict(row) for row in dataset]
    written = []
    for side in sides:
        try:
            scores = instance.score(list(prompts), list(dataset[side]),
                                    **{c: list(dataset[c]) for c in instance.columns})  # fmt: skip
        except ValueError as exc:
            raise TrlPlusError(f"--scorer {instance.name}: {exc}") from None
        names = [column or output for output in instance.outputs] if len(instance.outputs) == 1 else [
            f"{column}_{output}" if column else output for output in instance.outputs]
        for j, name in enumerate(names):
            key = f"{side}_{name}"
            for row, value in zip(rows, scores[:, j].tolist()):
                if as_list:
                    previous = row.get(key)
                    if previous is not None and not isinstance(previous, list):
                        raise TrlPlusError(f"{path}: column {key} holds {previous!r}, not a list: --list appends to "
                                           "a list column; pick another --column")  # fmt: skip
                    row[key] = [*(previous or []), value]
                else:
                    row[key] = value
            written.append(key)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out, written, len(rows)
