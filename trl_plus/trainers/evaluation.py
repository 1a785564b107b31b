"""Metrics (:class:`~trl_plus.Metric`) over a trainer's model: the one runner behind the recipe's ``metrics:`` at
every evaluation during training and ``trl-plus eval RUN --metric NAME`` on a saved checkpoint.

A metric sees what a loss sees: each batch's :class:`~trl_plus.LossContext` comes from
``PlusTrainer.build_context`` with the metric's :class:`~trl_plus.Needs`, in eval mode and without gradients. The
data are the pairs of an evaluation set (``prompt``, ``chosen``, ``rejected``), tokenized as TRL tokenizes a pair
and collated by the core's pairwise collator (``K = 2``, whatever the training method's own data shape), in data
order, never shuffled: the same checkpoint on the same data gives the same figures.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model

from ..contract import Metric
from ..data.collate import SEQ_MASK, FieldCollation, PairwiseCollator
from ..data.tokenize import tokenize_pair
from ..errors import TrlPlusError
from .adapters import reference_off
from .heads import checkpointing_off

logger = logging.getLogger(__name__)

#: The batch key holding each example's row index in the evaluated data (``values["index"]``).
INDEX = "metric_index"


@dataclass
class MetricResult:
    """One metric on one data set: its ``summary`` figures, every example's ``values`` (``values[key]``: one tensor per
    example, in data order) and the ``artefacts`` it wrote."""

    summary: dict[str, float]
    values: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    artefacts: list[Path] = field(default_factory=list)


def check_metric_needs(metric: Metric, trainer: Any) -> None:
    """A one-line error when the run cannot give ``metric`` what its ``needs`` ask (before any data is scored)."""
    needs = metric.needs
    where = f"metrics: {metric.name}"
    mode = trainer.reference_mode
    reads_reference = needs.reference == "yes" or "reference" in needs.teachers
    if reads_reference and mode == "none":
        raise TrlPlusError(f"{where}: needs a reference, and method {trainer.method.name!r} trains without one: set "
                           "reference.mode (model or adapter) or drop the metric")  # fmt: skip
    if reads_reference and mode == "precomputed" and not is_peft_model(trainer.accelerator.unwrap_model(trainer.model)):
        raise TrlPlusError(f"{where}: needs the reference on its own data, and this run precomputed the reference's "
                           "log-probs for its training data only: use reference.mode: model (or train with LoRA)")
    for name, kinds in needs.frozen_sources().items():
        if name != "reference" and name not in trainer.teachers:
            raise TrlPlusError(f"{where}: reads the teacher {name!r}, which this run does not load (its teachers: "
                               f"{', '.join(trainer.teachers) or 'none'})")  # fmt: skip
        if name != "reference" and trainer.teachers[name].mode == "precomputed":
            raise TrlPlusError(f"{where}: reads teacher {name!r} live on its own data; the run precomputed it: set "
                               f"teachers.{name}.mode: live")  # fmt: skip


def pair_rows(dataset: Any, tokenizer: Any, metric: Metric, where: str) -> list[dict[str, Any]]:
    """The metric's examples: each row tokenized as TRL tokenizes a pair, its ``needs.fields`` (and optional ones)
    kept, and its row index."""
    missing = [c for c in (*metric.data_fields, *metric.needs.fields) if c not in dataset.column_names and
               not (c == "prompt" and {"chosen", "rejected"} <= set(dataset.column_names))]  # fmt: skip
    if missing:
        raise TrlPlusError(f"{where}: metric {metric.name!r} needs the column(s) {', '.join(missing)}; the data has "
                           f"{', '.join(dataset.column_names)}")  # fmt: skip
    keep = (*metric.needs.fields, *metric.needs.optional_fields)
    rows = []
    for index, example in enumerate(dataset):
        row = tokenize_pair(example, tokenizer)
        row.update({name: example[name] for name in keep if name in example})
        row[INDEX] = index
        rows.append(row)
    return rows


class MetricsMixin:
    """What :class:`~trl_plus.PlusTrainer` does with metrics: :meth:`run_metrics` scores data sets with them, and
    ``evaluate()`` (every ``eval_steps``) runs the metrics given at construction on their sets and logs
    ``eval_<metric>/<key>`` (``eval_<set>_<metric>/<key>`` for named sets)."""

    metrics: tuple[Metric, ...] = ()
    metric_data: Mapping[str, Any] = {}
    metric_dir: str | None = None

    def set_metrics(self, metrics: Sequence[Metric], data: Mapping[str, Mapping[str, Any]] | None = None,
                    artefacts_dir: str | None = None) -> None:  # fmt: skip
        """Metrics to run at every evaluation, each on the data sets of its ``split``: ``data`` is
        ``{"eval": {set name: rows}, "train": {"train": rows}}`` (raw pair rows); artefacts go to
        ``artefacts_dir/step-<N>/``. Each metric's needs are checked against the run first (one line each)."""
        for metric in metrics:
            check_metric_needs(metric, self)
        self.metrics, self.metric_data, self.metric_dir = tuple(metrics), dict(data or {}), artefacts_dir

    def run_configured_metrics(self, out_dir: str | Path | None = None) -> dict[str, dict[str, MetricResult]]:
        """The metrics of :meth:`set_metrics`, each on its split's sets: ``{set: {metric: MetricResult}}``."""
        results: dict[str, dict[str, MetricResult]] = {}
        for split, sets in self.metric_data.items():
            chosen = [m for m in self.metrics if m.split == split]
            if chosen and sets:
                for set_name, per_metric in self.run_metrics(chosen, sets, out_dir).items():
                    results.setdefault(set_name, {}).update(per_metric)
        return results

    def run_metrics(self, metrics: Sequence[Metric], data: Mapping[str, Any], out_dir: str | Path | None = None,
                    desc: str = "metrics") -> dict[str, dict[str, MetricResult]]:  # fmt: skip
        """``{set: {metric: MetricResult}}`` of ``metrics`` on each data set of ``data`` (name -> raw pair rows),
        with the trainer's model as it is now; artefacts under ``out_dir/<set>/<metric>/`` (``out_dir/<metric>/``
        for a single set) when ``out_dir`` is given."""
        from tqdm.auto import tqdm

        results: dict[str, dict[str, MetricResult]] = {}
        quiet = self.args.disable_tqdm or not self.accelerator.is_main_process
        for set_name, dataset in data.items():
            results[set_name] = {}
            for metric in metrics:
                check_metric_needs(metric, self)
                metric.tokenizer, metric.data = self._tokenizer, dataset
                rows = pair_rows(dataset, self._tokenizer, metric, f"metrics: {metric.name} ({set_name})")
                values = self._metric_values(metric, rows, tqdm, quiet, f"{desc}: {metric.name} ({set_name})")
                result = MetricResult(summary=metric.summarize(values), values=values)
                if out_dir is not None and self.accelerator.is_main_process:
                    where = Path(out_dir) / (metric.name if len(data) == 1 else f"{set_name}/{metric.name}")
                    where.mkdir(parents=True, exist_ok=True)
                    result.artefacts = [Path(p) for p in metric.artefacts(values, where)]
                results[set_name][metric.name] = result
        return results

    def _metric_values(self, metric: Metric, rows: list[dict], tqdm, quiet: bool, desc: str) -> dict[str, list]:
        pad = self._tokenizer.pad_token_id
        collate = FieldCollation(PairwiseCollator(pad_token_id=pad, max_length=self.args.max_length,
                                                  truncation_mode=self.args.truncation_mode), metric.needs)  # fmt: skip
        batch_size = self.args.per_device_eval_batch_size
        values: dict[str, list] = {}
        model = self.model
        was_training = model.training
        model.eval()
        shared, self.prefix_sharing = self.prefix_sharing, False  # (the metric's batches are collated here)
        try:
            with (
                torch.no_grad(),
                checkpointing_off(model, self.args.activation_checkpointing_kwargs),
                self.accelerator.autocast(),
            ):
                for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=quiet):
                    chunk = [dict(row) for row in rows[start : start + batch_size]]
                    index = [row.pop(INDEX) for row in chunk]
                    inputs = collate(chunk)
                    if self.method.sequences_per_example != 2:  # the method's K is not the pairs' K = 2
                        inputs[SEQ_MASK] = torch.ones(2, len(chunk))
                    inputs = self._prepare_inputs(inputs)
                    ctx = self.build_context(model, inputs, metric.needs)
                    for key, value in metric.batch(ctx).items():
                        values.setdefault(key, []).extend(v.detach().cpu() for v in value)
                    values.setdefault("index", []).extend(torch.tensor(i) for i in index)
        finally:
            self.prefix_sharing = shared
            model.train(was_training)
        return values

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """TRL's evaluation (its loss and reward metrics on ``eval_dataset``), then the run's metrics on their data
        sets, logged as ``eval_<metric>/<key>`` (``eval_<set>_<metric>/<key>`` when there are several sets)."""
        output = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if not self.metrics or metric_key_prefix != "eval":
            return output
        out_dir = None if self.metric_dir is None else Path(self.metric_dir) / f"step-{self.state.global_step}"
        logged = metric_logs(self.run_configured_metrics(out_dir))
        self.log(logged)
        output.update(logged)
        return output

    # -- the reference as a frozen source (a metric's Needs(teachers={"reference": "logits"})) ------------------
    def reference_source(self) -> tuple[Any, Any]:
        """The model to run for the reference and what makes the context it runs in (the policy with its adapter
        off, or the frozen ``ref`` adapter, or the separate reference model)."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext
        policy = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(policy):
            raise TrlPlusError("the reference's outputs need a reference model or a LoRA policy (adapter off); this "
                               "run has neither")  # fmt: skip
        return self.model, lambda: reference_off(policy, getattr(self, "named_adapters", False))



def metric_logs(results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, float]:
    """``{set: {metric: result}}`` as flat log keys: ``eval_<metric>/<key>``, or ``eval_<set>_<metric>/<key>`` when
    there are several sets (a ``train``-split metric: ``train_<metric>/<key>``)."""
    logged = {}
    for set_name, per_metric in results.items():
        prefix = set_name if set_name in ("eval", "train") else f"eval_{set_name}"
        for name, result in per_metric.items():
            logged.update({f"{prefix}_{name}/{key}": value for key, value in result.summary.items()})
    return logged
