"""Egida safety retrofitting — Efficient Safety Retrofitting Against Jailbreaking for LLMs (Garcia-Gasulla et al.,
2025, arXiv 2502.13603; data HPAI-BSC/Egida; no official training code): a DPO data recipe.

Pairs are built offline, one per unsafe prompt, from judged answers (:meth:`EgidaSafety.prepare_data`):

- rejected = the target model's own answer, kept only when the judge (Llama-Guard-3-8B) says it is unsafe;
- chosen = the answer of the first generator, in priority order (Mistral-7B-v0.3, then Phi-3-Small-8k), that the
  judge says is safe; a prompt with no safe candidate is dropped;
- a prompt of the test split (a ``split`` column saying ``test``, or a prompt listed in ``heldout_prompts``) never
  becomes a training row.

The loss is standard DPO, −log σ(β[(ℓθ − ℓref)(y_w) − (ℓθ − ℓref)(y_l)]), inherited unchanged from ``trl_plus.DPO``.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, PositiveInt

from trl_plus import DPO, DPOConfig, ListField, Needs, Paper, TrlPlusError, hookimpl

logger = logging.getLogger(__name__)

#: The raw columns of a judged row (one row per prompt): the target's answer and verdict, and the candidates'.
TARGET_COLUMNS = ("target_response", "target_label")
CANDIDATE_COLUMNS = ("candidate_models", "candidate_responses", "candidate_labels")
RAW_COLUMNS = TARGET_COLUMNS + CANDIDATE_COLUMNS
#: The generators of the paper's chosen answers, in priority order (Hub ids inferred from the names it gives).
GENERATORS = ("mistralai/Mistral-7B-Instruct-v0.3", "microsoft/Phi-3-small-8k-instruct")
HELDOUT_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class EgidaConfig(DPOConfig):
    """DPO's hyperparameters (the paper gives none: β 0.1 is the card's recommendation) plus the pair rule's."""

    generators: tuple[str, ...] = Field(
        GENERATORS, min_length=1,
        description="safe-answer generators in priority order: chosen = the first one judged safe (paper: Mistral "
                    "7B v0.3, then Phi-3 Small 8k)",
    )  # fmt: skip
    heldout_prompts: str | None = Field(
        None, description="a jsonl/json/csv/parquet file of test-split prompts (column prompt or question) never "
                          "trained on; rows with split: test are always left out",
    )  # fmt: skip
    max_pairs: PositiveInt | None = Field(None, description="keep at most this many pairs, sampled uniformly with seed "
                                                            "(paper: 2,000 per target; sampling rule not stated)")  # fmt: skip
    seed: int = Field(0, description="seed of the max_pairs sample")


def verdict(value: Any, row: int, column: str) -> bool:
    """``True`` when a judge label says unsafe: ``"safe"`` / ``"unsafe"`` (Llama Guard's first output line; its
    category line, e.g. ``"unsafe\\nS2"``, is ignored), any case."""
    word = value.strip().split()[0].lower() if isinstance(value, str) and value.strip() else None
    if word not in ("safe", "unsafe"):
        raise TrlPlusError(f"row {row}: column {column!r} holds {value!r}; a judge label is 'safe' or 'unsafe' (Llama "
                           "Guard's verdict line)")  # fmt: skip
    return word == "unsafe"


def normalise(prompt: str) -> str:
    """The form in which prompts are compared with the held-out ones: case-folded, whitespace collapsed."""
    return " ".join(str(prompt).split()).casefold()


def read_heldout(path: str) -> set[str]:
    """The normalised prompts of ``path`` (its ``prompt`` column, else ``question``: Egida's name)."""
    from pathlib import Path

    from datasets import load_dataset

    file = Path(path).expanduser()
    if not file.is_file() or file.suffix not in HELDOUT_FORMATS:
        raise TrlPlusError(f"method_args.heldout_prompts: no such {'/'.join(HELDOUT_FORMATS)} file: {path}")
    data = load_dataset(HELDOUT_FORMATS[file.suffix], data_files=str(file), split="train")
    column = next((c for c in ("prompt", "question") if c in data.column_names), None)
    if column is None:
        raise TrlPlusError(f"method_args.heldout_prompts: {path} has no prompt or question column (it has "
                           f"{', '.join(data.column_names)})")  # fmt: skip
    return {normalise(p) for p in data[column]}


def choose(models: list[str], responses: list[str], labels: list[str], generators: tuple[str, ...], row: int):
    """``(model, response)`` of the highest-priority generator judged safe, or ``None``."""
    safe = {}
    for model, response, label in zip(models, responses, labels):
        if model not in generators:
            raise TrlPlusError(f"row {row}: column 'candidate_models' names {model!r}, which is not one of "
                               f"method_args.generators ({', '.join(generators)}): add it there, in priority order")  # fmt: skip
        if model in safe:
            raise TrlPlusError(f"row {row}: column 'candidate_models' lists {model!r} twice; give one answer per "
                               "generator")  # fmt: skip
        safe[model] = None if verdict(label, row, "candidate_labels") else response
    return next(((m, safe[m]) for m in generators if safe.get(m) is not None), None)


class EgidaSafety(DPO):
    """DPO on safety pairs: a safe answer of another model (chosen) vs the target's own unsafe answer (rejected)."""

    name = "egida-safety"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "constraint.safety": "safety", "property": "alignment-tax", "scope": "text", "source": "inferred"}
    family = "data-recipe"
    paper = Paper("Efficient Safety Retrofitting Against Jailbreaking for LLMs", "2502.13603")
    summary = "DPO data recipe: other models' safe answers vs the target's own judged-unsafe answers to jailbreaks"
    needs = Needs(
        reference="yes",
        list_fields=(
            ListField("candidate_models", dtype="text", required=False),
            ListField("candidate_responses", dtype="text", same_length_as="candidate_models", required=False),
            ListField("candidate_labels", dtype="text", same_length_as="candidate_models", required=False),
        ),
    )
    Config = EgidaConfig
    #: ``prompt`` plus, per row, either the raw judged columns (:data:`RAW_COLUMNS`: pairs are built) or ready pairs
    #: ``chosen``/``rejected`` (the released Egida-DPO configurations, built by the same rule): both are accepted, so
    #: the columns a file must have are checked by :meth:`prepare_data`.
    data_fields = ("prompt",)
    example_data = {"path": "recipes/data/egida_sample.jsonl"}

    def prepare_data(self, dataset, split: str):
        """Raw judged rows -> ``prompt``/``chosen``/``rejected`` (+ ``chosen_model`` and the row's other columns,
        e.g. ``topic``, ``attack_style``, ``source``); the raw columns are removed, so a second call sees pairs and
        only re-applies the idempotent filters (test split, held-out prompts, ``max_pairs``)."""
        columns = set(dataset.column_names)
        present = [c for c in RAW_COLUMNS if c in columns]
        if present and len(present) < len(RAW_COLUMNS):
            missing = [c for c in RAW_COLUMNS if c not in columns]
            raise TrlPlusError(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: "
                               f"method {self.name!r} builds pairs from {', '.join(RAW_COLUMNS)} (or trains on ready "
                               "prompt/chosen/rejected pairs)")  # fmt: skip
        if present:
            if {"chosen", "rejected"} & columns:
                raise TrlPlusError("the data has both judged answers (target_response, candidate_*) and "
                                   "chosen/rejected columns: give one of the two formats")  # fmt: skip
            dataset = self.build_pairs(dataset)
        elif not {"chosen", "rejected"} <= columns:
            raise TrlPlusError(f"method {self.name!r} needs either the judged columns {', '.join(RAW_COLUMNS)} or "
                               f"ready chosen/rejected pairs; the data has {', '.join(dataset.column_names)}")  # fmt: skip
        return self.filter_pairs(dataset)

    def build_pairs(self, dataset):
        """The pair rule on raw rows; rows of the test split are dropped first."""
        generators = self.config.generators
        data = {c: dataset[c] for c in ("prompt", *RAW_COLUMNS)}
        splits = dataset["split"] if "split" in dataset.column_names else [None] * len(dataset)
        kept, chosen, models = [], [], []
        counts = {"test split": 0, "target answer judged safe": 0, "no candidate judged safe": 0}
        for i in range(len(dataset)):
            row = i + 1
            if not isinstance(data["target_response"][i], str):
                raise TrlPlusError(f"row {row}: column 'target_response' must be text, not {data['target_response'][i]!r}")
            if not all(isinstance(data[c][i], list) for c in CANDIDATE_COLUMNS):
                raise TrlPlusError(f"row {row}: columns {', '.join(CANDIDATE_COLUMNS)} must be lists (one entry per "
                                   "generator's answer)")  # fmt: skip
            target_unsafe = verdict(data["target_label"][i], row, "target_label")
            best = choose(*(data[c][i] for c in CANDIDATE_COLUMNS), generators, row)
            if splits[i] == "test":
                counts["test split"] += 1
            elif not target_unsafe:
                counts["target answer judged safe"] += 1
            elif best is None:
                counts["no candidate judged safe"] += 1
            else:
                kept.append(i)
                models.append(best[0])
                chosen.append(best[1])
        rejected = [data["target_response"][i] for i in kept]
        logger.info("egida-safety: %d pairs from %d rows (dropped: %s)", len(kept), len(dataset),
                    ", ".join(f"{n} {why}" for why, n in counts.items()))  # fmt: skip
        pairs = dataset.select(kept).remove_columns(list(RAW_COLUMNS))
        return pairs.add_column("chosen", chosen).add_column("rejected", rejected).add_column("chosen_model", models)

    def filter_pairs(self, dataset):
        """Never a test-split prompt (``split: test`` rows, ``heldout_prompts``); then at most ``max_pairs`` pairs."""
        if "split" in dataset.column_names and "test" in set(dataset["split"]):
            dataset = dataset.select([i for i, s in enumerate(dataset["split"]) if s != "test"])
        if self.config.heldout_prompts:
            heldout = read_heldout(self.config.heldout_prompts)
            keep = [i for i, p in enumerate(dataset["prompt"]) if normalise(p) not in heldout]
            if len(keep) < len(dataset):
                logger.info("egida-safety: %d pairs left out: their prompt is in %s", len(dataset) - len(keep),
                            self.config.heldout_prompts)  # fmt: skip
                dataset = dataset.select(keep)
        limit = self.config.max_pairs
        if limit is not None and len(dataset) > limit:
            dataset = dataset.shuffle(seed=self.config.seed).select(range(limit))
        return dataset


@hookimpl
def register_methods(register):
    """Register ``egida-safety``."""
    register(EgidaSafety)
