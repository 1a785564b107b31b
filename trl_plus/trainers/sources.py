"""Named frozen sources of :class:`~trl_plus.PlusTrainer` (``Needs.teachers``): a separate model, a frozen LoRA
adapter on the policy's own base, or columns precomputed once and cached (:mod:`trl_plus.trainers.columns`).

Every source runs on the policy's own sequences, so its outputs line up with ``ctx.token_logps``; what it gives
(label log-probs, top-k, scored logits, hidden states) is what the method asked for, nothing more. The precomputed
reference (``reference.mode: precomputed``) takes the same cached path.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from torch.utils.data import DataLoader
from trl.trainer.utils import add_fused_lm_head

from ..contract import FrozenOutputs, Method, TopK
from ..data.collate import SEQ_MASK, SEQUENCE_SLOTS
from ..data.load import few_rows, quiet_progress
from ..errors import TrlPlusError, did_you_mean
from .adapters import active_adapter
from .columns import (
    cache_key,
    cached_columns,
    data_digest,
    folder_identity,
    module_identity,
)
from .frozen import HIDDEN_KINDS, REF_COLUMN, Teacher
from .heads import HiddenHead, backbone_hidden, capture_hidden, checkpointing_off


def needs_hidden(kinds: tuple) -> bool:
    """Whether the output kinds need the last hidden states (top-k, scored logits, hidden states)."""
    return any(isinstance(kind, TopK) or kind in HIDDEN_KINDS for kind in kinds)


def teacher_columns(name: str, kinds: tuple) -> dict[str, str]:
    """The precomputed columns of teacher ``name`` (column -> payload kind, see ``columns.column_features``)."""
    columns = {}
    for kind in kinds:
        if kind == "logps":
            columns[f"frozen_{name}_logps"] = "logps"
        elif isinstance(kind, TopK):
            columns[f"frozen_{name}_topk_ids"] = "topk_ids"
            columns[f"frozen_{name}_topk_logps"] = "topk_logps"
    return columns


def adapter_name(name: str) -> str:
    """The PEFT adapter name of teacher ``name`` on the policy."""
    return f"teacher_{name}"


def per_example_lists(batch: Mapping[str, Any], per_row: list, num_sequences: int) -> list[list]:
    """Per-row values of a collated batch -> per example, its real sequences' values in ``k`` order (the layout of
    precomputed columns, which :class:`~trl_plus.data.collate.FieldCollation` scatters back)."""
    slots = batch.get(SEQUENCE_SLOTS)
    size = len(per_row) // num_sequences if slots is None else batch[SEQ_MASK].size(1)
    places = range(len(per_row)) if slots is None else slots.tolist()
    examples: list[list] = [[] for _ in range(size)]
    for slot, values in sorted(zip(places, per_row), key=lambda item: item[0]):
        examples[slot % size].append(values)
    return examples


class FrozenSourcesMixin:
    """Teachers for :class:`~trl_plus.PlusTrainer`: checked before the policy is wrapped (:meth:`_check_teachers`),
    loaded or precomputed after (:meth:`_attach_teachers`), and run per batch (:meth:`frozen_outputs`)."""

    # -- construction -----------------------------------------------------------------------------------------
    def _check_teachers(self, teachers: Mapping[str, Any] | None, teacher_model: Any, will_be_peft: bool) -> None:
        """The teachers a method needs, normalised to :class:`~trl_plus.Teacher` and checked (names, modes)."""
        given = {name: t if isinstance(t, Teacher) else Teacher(model=t) for name, t in (teachers or {}).items()}
        if teacher_model is not None:
            if "teacher" in given:
                raise TrlPlusError("pass the teacher once: teacher_model or teachers={'teacher': ...}, not both")
            given["teacher"] = Teacher(model=teacher_model)
        needs = self.method.needs
        wanted = needs.frozen_sources()
        if needs.teacher:
            wanted.setdefault("teacher", ("logps",))
        for name in wanted:
            if name not in given:
                raise TrlPlusError(f"teachers.{name}: method {self.method.name!r} needs a teacher named {name!r} "
                                   f"(recipe block `teachers: {{{name}: {{name_or_path: DIR}}}}`, or `adapter: DIR` "
                                   "for a LoRA adapter on the policy's base)")  # fmt: skip
        for name, teacher in given.items():
            if name not in wanted:
                hint = did_you_mean(name, list(wanted)) or f" (it uses: {', '.join(wanted) or 'none'})"
                raise TrlPlusError(f"teachers.{name}: method {self.method.name!r} uses no teacher named {name!r}"
                                   f"{hint}")  # fmt: skip
            if (teacher.model is None) == (teacher.adapter is None):
                raise TrlPlusError(f"teachers.{name}: give a model or an adapter (one of the two)")
            if teacher.mode not in ("live", "precomputed"):
                raise TrlPlusError(f"teachers.{name}.mode: {teacher.mode!r} is not one of live, precomputed")
            if teacher.mode == "precomputed" and any(k in HIDDEN_KINDS for k in wanted[name]):
                raise TrlPlusError(f"teachers.{name}.mode: precomputed columns hold label log-probs and top-k only; "
                                   f"method {self.method.name!r} reads {name!r}'s logits or hidden states at every "
                                   "step: use mode: live")  # fmt: skip
            if teacher.adapter is not None and not will_be_peft:
                raise TrlPlusError(f"teachers.{name}.adapter: a frozen adapter rides the policy's own LoRA base: set "
                                   "model.lora, or load the teacher as a model (name_or_path)")  # fmt: skip
        self.teachers, self.teacher_kinds = given, wanted
        self.teacher_models: dict[str, Any] = {}

    def _attach_teachers(self) -> None:
        """After the policy is built: frozen adapters loaded onto it, live models placed, precomputed columns read
        from the cache or computed (the teacher loads only on a miss, and is freed after)."""
        policy = self.accelerator.unwrap_model(self.model)
        for name, teacher in self.teachers.items():
            if teacher.adapter is not None:
                self._load_teacher_adapter(policy, name, teacher.adapter)
            elif teacher.mode == "live":
                self.teacher_models[name] = self._place_teacher(name, teacher.model)
        columns = {}
        for name, teacher in self.teachers.items():
            if teacher.mode == "precomputed":
                columns.update(teacher_columns(name, self.teacher_kinds[name]))
                for attribute, split in (("train_dataset", "train"), ("eval_dataset", "eval")):
                    dataset = getattr(self, attribute)
                    if isinstance(dataset, Dataset):
                        setattr(self, attribute, self._precompute_teacher(dataset, split, name, teacher))
                self.teacher_models.pop(name, None)
                if teacher.adapter is not None:
                    policy.delete_adapter(adapter_name(name))  # its columns are all the run needs of it
        self.method_collator.token_columns = (*self.method_collator.token_columns, *columns)
        if self._signature_columns is not None:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *columns]))
        self._teacher_columns = tuple(columns)

    def _place_teacher(self, name: str, model: Any) -> Any:
        if callable(model) and not isinstance(model, torch.nn.Module):
            model = model()
        self._check_vocabulary(name, model.config)
        add_fused_lm_head(model)
        return self.accelerator.prepare_model(model.eval().requires_grad_(False), evaluation_mode=True)

    def _check_vocabulary(self, name: str, config: Any, what: str = "model") -> None:
        """A teacher's output layer must be the policy's: same vocabulary size (its ids index the policy's)."""
        policy = self.accelerator.unwrap_model(self.model).config.get_text_config()
        theirs = getattr(config.get_text_config(), "vocab_size", None)
        if theirs is not None and theirs != policy.vocab_size:
            raise TrlPlusError(f"teachers.{name}: the teacher {what}'s vocabulary has {theirs} tokens, the policy's "
                               f"{policy.vocab_size}: a teacher must share the policy's tokenizer")  # fmt: skip

    def _load_teacher_adapter(self, policy: Any, name: str, path: str) -> None:
        """Teacher ``name`` as a frozen adapter on the policy's base: refused when it was trained on another base
        model or vocabulary."""
        from transformers import AutoConfig

        config_file = Path(path) / "adapter_config.json"
        if not config_file.is_file():
            raise TrlPlusError(f"teachers.{name}.adapter: {path} holds no adapter_config.json (a LoRA adapter folder, "
                               "as a LoRA run saves it)")  # fmt: skip
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
        ours = policy.get_base_model().config._name_or_path
        if base and not _same_model(base, ours):
            raise TrlPlusError(f"teachers.{name}.adapter: {path} was trained on {base}, the policy is {ours}: an "
                               "adapter teacher must share the policy's base model (else load the teacher as a "
                               "model: name_or_path)")  # fmt: skip
        if base and (Path(base) / "config.json").is_file():
            self._check_vocabulary(name, AutoConfig.from_pretrained(base), "adapter's base")
        try:
            policy.load_adapter(path, adapter_name=adapter_name(name), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrlPlusError(f"teachers.{name}.adapter: {path} does not fit the policy's base: "
                               f"{str(exc).splitlines()[0]}") from None  # fmt: skip

    # -- one batch --------------------------------------------------------------------------------------------
    def _source(self, name: str) -> tuple[Any, Callable[[], contextlib.AbstractContextManager]]:
        """The model to run for teacher ``name`` and what makes the context to run it in (its adapter active)."""
        teacher = self.teachers[name]
        if teacher.adapter is not None:
            policy = self.accelerator.unwrap_model(self.model)
            return self.model, lambda: active_adapter(policy, adapter_name(name))
        return self.teacher_models[name], contextlib.nullcontext

    def frozen_rows(self, model, inputs: Mapping[str, Any], kinds: tuple,
                    context: Callable[[], Any] = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """``kinds`` of a frozen ``model`` on the batch's plain rows (no grad), run inside ``context()`` (e.g. a
        teacher adapter switched on): ``logps`` ``[N, T]``, ``topk_ids`` / ``topk_logps`` ``[N, T, k]`` (ids -1 /
        log-probs 0 off the scored tokens), ``logits`` ``[M, V]`` at the scored tokens, ``hidden_states``
        ``[N, T, H]``. Label log-probs alone take TRL's fused head (prefix-shared when the run shares prefixes);
        anything else runs the backbone once and the LM head only at the scored positions, the label log-probs
        included."""
        if not needs_hidden(kinds):
            with context():
                return {"logps": self.frozen_token_logps(model, inputs)}
        with (
            torch.no_grad(),
            checkpointing_off(self.model, self.args.activation_checkpointing_kwargs),
            context(),
            self.accelerator.autocast(),
        ):
            hidden = backbone_hidden(model, self._model_kwargs(inputs))
        head = HiddenHead.of(model, hidden)
        where = inputs["completion_mask"][:, 1:].bool()
        rows = {}
        with torch.no_grad():
            logits = head.logits(where) if "logits" in kinds else None
            if logits is not None:
                rows["logits"] = logits
            for kind in kinds:
                if kind == "logps":
                    labels = inputs["input_ids"][:, 1:][where].unsqueeze(-1)
                    at = (logits.log_softmax(-1).gather(-1, labels) if logits is not None
                          else head.logps_at(where, labels))  # fmt: skip
                    rows["logps"] = at.new_zeros(where.shape).masked_scatter(where, at[:, 0])
                elif isinstance(kind, TopK):
                    logps, ids = (logits.log_softmax(-1).topk(kind.k, -1) if logits is not None
                                  else head.topk(where, kind.k)[::-1])  # fmt: skip
                    rows["topk_ids"] = ids.new_full((*where.shape, kind.k), -1).masked_scatter(where[..., None], ids)
                    rows["topk_logps"] = logps.new_zeros((*where.shape, kind.k)).masked_scatter(where[..., None], logps)
                elif kind == "hidden_states":
                    rows["hidden_states"] = hidden
        return rows

    def frozen_outputs(self, name: str, inputs: Mapping[str, Any], kinds: tuple | None = None) -> FrozenOutputs:
        """Teacher ``name``'s outputs for the batch (``kinds``: the method's), on the ``[K, B, T, ...]`` grid: live
        (its model or its adapter) or read from the batch's precomputed columns."""
        kinds = self.teacher_kinds[name] if kinds is None else kinds
        if self.teachers[name].mode == "precomputed":
            batch = {kind: inputs[column] for column, kind in teacher_columns(name, kinds).items()}
            return FrozenOutputs(
                logps=self.to_grid(inputs, batch["logps"]) if "logps" in batch else None,
                topk_ids=self.to_grid(inputs, batch["topk_ids"], fill=-1) if "topk_ids" in batch else None,
                topk_logps=self.to_grid(inputs, batch["topk_logps"]) if "topk_logps" in batch else None,
            )  # fmt: skip
        model, context = self._source(name)
        return self.outputs_on_grid(inputs, self.frozen_rows(model, inputs, kinds, context))

    def outputs_on_grid(self, inputs: Mapping[str, Any], rows: Mapping[str, torch.Tensor]) -> FrozenOutputs:
        """:meth:`frozen_rows`' per-row outputs as a :class:`~trl_plus.FrozenOutputs` on the ``[K, B, T, ...]`` grid
        (``logits`` stay ``[M, V]``)."""
        return FrozenOutputs(**{
            kind: value if kind == "logits" else self.to_grid(inputs, value, fill=-1 if kind == "topk_ids" else 0)
            for kind, value in rows.items()
        })  # fmt: skip

    def policy_head(self, model, inputs: Mapping[str, Any], compute: Callable[[], Any]) -> tuple[Any, HiddenHead]:
        """Run ``compute()`` (the policy forward) recording the final hidden states; returns its result and the
        policy's :class:`~trl_plus.trainers.heads.HiddenHead` on them, on the ``[K, B, T, H]`` grid (with grad)."""
        with capture_hidden(model) as seen:
            result = compute()
        return result, HiddenHead.of(model, self.to_grid(inputs, seen[-1][:, :-1]))

    # -- precomputed columns ----------------------------------------------------------------------------------
    def _precompute_teacher(self, dataset: Dataset, split: str, name: str, teacher: Teacher) -> Dataset:
        kinds = self.teacher_kinds[name]
        columns = teacher_columns(name, kinds)
        if teacher.adapter is not None:  # its outputs are the adapter's on the policy's (maybe 4-bit) base
            base = self.accelerator.unwrap_model(self.model).get_base_model()
            quantization = getattr(base.config, "quantization_config", None)
            identity = json.dumps([teacher.identity or folder_identity(teacher.adapter),
                                   _base_identity(base),
                                   str(base.dtype), str(quantization.to_dict() if quantization else None)])
        else:
            if teacher.identity is None and name not in self.teacher_models:
                self.teacher_models[name] = self._place_teacher(name, teacher.model)
            identity = teacher.identity or module_identity(self.teacher_models[name])

        def compute():
            if teacher.adapter is None and name not in self.teacher_models:  # a cache miss: load it now
                self.teacher_models[name] = self._place_teacher(name, teacher.model)
            model, context = self._source(name)
            return self._frozen_columns(dataset, split, f"teacher {name!r}", columns,
                                        lambda batch: self.frozen_rows(model, batch, kinds, context))  # fmt: skip

        return self._with_columns(dataset, identity, columns, compute)

    def _with_columns(self, dataset: Dataset, identity: str, columns: Mapping[str, str], compute) -> Dataset:
        """``dataset`` with the cached (or newly computed) ``columns`` of source ``identity`` beside it."""
        if isinstance(dataset, IterableDataset):
            raise TrlPlusError("precomputed columns need a map-style dataset, not a streaming one")
        key = cache_key(data=data_digest(dataset, self.method.tokenized_columns), collation=self._collation_identity(),
                        source=identity, columns=dict(columns))  # fmt: skip
        table, computed = cached_columns(key, columns, compute, self.accelerator.is_main_process,
                                         self.accelerator.wait_for_everyone)  # fmt: skip
        self.column_cache_hits = getattr(self, "column_cache_hits", 0) + (not computed)
        present = [c for c in columns if c in dataset.column_names]
        with quiet_progress(few_rows(dataset)):  # datasets flattens a selection's indices first, with a bar
            return concatenate_datasets([dataset.remove_columns(present) if present else dataset, table], axis=1)

    def _collation_identity(self) -> dict[str, Any]:
        """How the collator turns tokenized rows into sequences (part of a column key): the core's pairwise
        collator, or the method's own with its configuration; ``max_length`` and ``truncation_mode``."""
        own = type(self.method).collator is not Method.collator
        return {
            "collator": f"{self.method.name}:{self.method.config.model_dump_json()}" if own else "core",
            "max_length": self.args.max_length, "truncation_mode": self.args.truncation_mode,
            "sequences": self.method.sequences_per_example,
        }  # fmt: skip

    def _frozen_columns(self, dataset: Dataset, split: str, what: str, columns: Mapping[str, str],
                        run: Callable[[Mapping[str, Any]], dict]) -> dict[str, list]:
        """Per example, per real sequence, per scored token: ``columns`` of ``run(batch)`` (its per-row outputs)."""
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator,
                                                     shuffle=False))  # fmt: skip
        out: dict[str, list] = {column: [] for column in columns}
        quiet = self.args.disable_tqdm or bool(os.environ.get("TQDM_DISABLE"))
        for batch in tqdm(loader, desc=f"Computing {what} outputs for the {split} dataset", disable=quiet):
            rows = run(batch)
            mask = batch["completion_mask"][:, 1:].bool()
            for column, kind in columns.items():
                values = rows[kind].float() if kind != "topk_ids" else rows[kind]
                values, where = values.cpu(), mask.cpu()
                per_row = [values[i][where[i]].tolist() for i in range(values.size(0))]
                out[column] += per_example_lists(batch, per_row, self.num_sequences(batch))
        return {column: self.accelerator.gather_for_metrics(values, use_gather_object=True)
                for column, values in out.items()}  # fmt: skip

    def _reference_columns(self, dataset: Dataset, split: str, identity: str, model, adapter_off: bool) -> Dataset:
        """The precomputed reference (``reference.mode: precomputed``) on the cached column path."""

        def compute():
            return self._frozen_columns(dataset, split, "reference", {REF_COLUMN: "logps"},
                                        lambda batch: {"logps": self.frozen_token_logps(model, batch, adapter_off)})

        return self._with_columns(dataset, identity, {REF_COLUMN: "logps"}, compute)


def _same_model(theirs: str, ours: str) -> bool:
    """Whether two model names or folders are the same base model (resolved paths, or the same hub name)."""
    a, b = Path(theirs), Path(ours)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return theirs.rstrip("/") == ours.rstrip("/")



def _base_identity(base: Any) -> str:
    """The policy's base model in a cache key: its folder's files when it was loaded from one, else its weights."""
    path = base.config._name_or_path
    return folder_identity(path) if path and Path(path).is_dir() else module_identity(base)
