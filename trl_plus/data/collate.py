"""Data collators. The core's default is TRL's pairwise collator (:class:`PairwiseCollator`);
:class:`SequencesCollator` serves methods with other shapes (one sequence, six, a prompt per side, a different
number per example, token-aligned columns); :class:`FieldCollation` adds a method's per-example fields to any of
them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from . import sharing
from .sharing import SEQ_MASK, SEQUENCE_SLOTS

if TYPE_CHECKING:
    from ..contract import Method

#: Batch key: how many of the batch's sequences ``max_length`` cut (the trainer logs the fraction as ``truncated``).
TRUNCATED = "num_truncated"


# Batch keys of variable-K batches (defined in .sharing, which reads them): ``seq_mask`` ``[K, B]`` (``True`` where
# example ``b`` has a ``k``-th sequence; :class:`SequencesCollator` always emits it) and ``sequence_slots`` ``[N]``
# (each row's place ``k * B + b`` in the ``K x B`` grid; only when some example has fewer than ``K`` sequences: the
# rows are then the real ones only).

#: The pad value of token-aligned columns (``Sequence.tokens``): ``-1`` = no segment.
TOKEN_PAD = -1


@dataclass
class PairwiseCollator(DataCollatorForPreference):
    """TRL's ``DataCollatorForPreference`` (``[chosen_1..B, rejected_1..B]``, right-padded, completion mask) that
    also counts the sequences ``max_length`` cuts and can list an example's sequences (for the truncation report).
    The method's extra fields are added by :class:`FieldCollation`, which wraps every collator."""

    side_names: ClassVar[tuple[str, ...]] = ("chosen", "rejected")

    def sequences(self, example: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
        """The example's two sequences before truncation, as ``(ids, score mask)``: prompt + chosen, prompt +
        rejected (for the truncation report)."""
        return [prompt_completion(example["prompt_ids"], example[f"{side}_ids"]) for side in self.side_names]

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if self.max_length is not None:
            lengths = [len(e["prompt_ids"]) + len(e[f"{side}_ids"]) for side in self.side_names for e in examples]
            batch[TRUNCATED] = torch.tensor(sum(n > self.max_length for n in lengths))
        return batch


def prompt_completion(prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int]]:
    """One sequence for :class:`SequencesCollator`: ``prompt + completion`` ids and a mask scoring the completion."""
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


class Sequence(NamedTuple):
    """One sequence for :class:`SequencesCollator`: token ``ids``, the ``scored`` mask (1 on tokens the loss scores)
    and token-aligned columns ``tokens`` (name -> one value per id, e.g. IRPO's item ids; see
    ``Needs.token_fields``). A plain ``(ids, scored)`` tuple is a sequence without token columns."""

    ids: list[int]
    scored: list[int]
    tokens: dict[str, list] = {}


class SequencesCollator:
    """Any number of sequences per example: ``sequences(example)`` returns the example's sequences as
    :class:`Sequence` s (or ``(token ids, score mask)`` pairs, see :func:`prompt_completion`); the batch is
    ``[N, L]``, sequence-major (``[seq0_ex1..seq0_exB, seq1_ex1..]``), right-padded, each sequence cut to
    ``max_length`` from the end (``keep_start``) or the start (``keep_end``) like TRL's preference collator, with
    ``completion_mask`` = the score mask and each token column cut and padded (with ``-1``) alike.
    ``side_names`` names the sequences in the truncation report (default ``sequence k``).

    Examples may have different counts (``K`` = the batch's largest): then only the real sequences are rows
    (``N = sum_b K_b``: padded slots are never forwarded) and ``sequence_slots`` places them in the ``K x B`` grid;
    ``seq_mask`` ``[K, B]`` is always in the batch."""

    def __init__(
        self,
        sequences: Callable[[dict[str, Any]], list[Sequence | tuple[list[int], list[int]]]],
        pad_token_id: int,
        max_length: int | None,
        truncation_mode: str = "keep_start",
        side_names: tuple[str, ...] = (),
    ):
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', not {truncation_mode!r}")
        self.sequences, self.pad_token_id, self.side_names = sequences, pad_token_id, side_names
        self.max_length = max_length
        if max_length is None:
            self.window = slice(None)
        else:
            self.window = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from trl.trainer.utils import pad

        per_example = [[Sequence(*s) for s in self.sequences(example)] for example in examples]
        counts = [len(sequences) for sequences in per_example]
        num_sequences, size = max(counts), len(examples)
        rows = [(k, b) for k in range(num_sequences) for b in range(size) if k < counts[b]]
        chosen = [per_example[b][k] for k, b in rows]
        ids = [torch.tensor(s.ids[self.window]) for s in chosen]
        batch = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="right"),
            "completion_mask": pad([torch.tensor(s.scored[self.window]) for s in chosen], padding_value=0,
                                   padding_side="right"),
        }  # fmt: skip
        for name in chosen[0].tokens:
            values = [torch.tensor(s.tokens[name][self.window]) for s in chosen]
            batch[name] = pad(values, padding_value=TOKEN_PAD, padding_side="right")
        batch[SEQ_MASK] = torch.arange(num_sequences).unsqueeze(1) < torch.tensor(counts).unsqueeze(0)
        if len(rows) < num_sequences * size:
            batch[SEQUENCE_SLOTS] = torch.tensor([k * size + b for k, b in rows])
        if self.max_length is not None:
            batch[TRUNCATED] = torch.tensor(sum(len(s.ids) > self.max_length for s in chosen))
        return batch


def _pad_lists(values: list[list], pad_value: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists -> ``[B, L]`` values and ``[B, L]`` bool mask."""
    width = max((len(v) for v in values), default=0)
    out = torch.full((len(values), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(values), width), dtype=torch.bool)
    for i, row in enumerate(values):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
        mask[i, : len(row)] = True
    return out, mask


class FieldCollation:
    """The one field-collation path, wrapped around every collator (the core's, a method's, a user's): it stacks
    ``needs.fields`` (and the ``needs.optional_fields`` the batch has) into ``[B]`` / ``[B, ...]`` tensors, pads
    the numeric ``needs.list_fields`` the examples have to ``[B, L]`` with ``name + "_mask"``, and turns precomputed per-token columns
    (``ref_token_logps``: one list per real sequence of the example, one value per scored token) into ``[N, T]``
    tensors on the collated rows' shifted completion mask. Other attributes (``sequences``, ``side_names``) are the
    wrapped collator's."""

    #: Compact per-token columns scattered onto the shifted completion mask: the precomputed reference (the trainer
    #: adds precomputed teachers' columns, ``trl_plus.trainers.sources.teacher_columns``).
    token_columns: tuple[str, ...] = ("ref_token_logps",)

    def __init__(self, collator: Callable, needs: Any):
        self.collator, self.needs = collator, needs
        #: ``(pad_token_id, sequences per example, pack)`` when the trainer runs prefix sharing: each batch then also
        #: carries its shared layout (``trl_plus.data.sharing``), built here on the CPU, in the data loader.
        self.share: tuple[int, int, bool] | None = None

    def __getattr__(self, name: str) -> Any:
        if name in ("collator", "needs", "share"):
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        compact = {name: [e.pop(name) for e in examples] for name in self.token_columns if name in examples[0]}
        batch = self.collator(examples)
        for name in self.needs.fields:
            batch[name] = torch.tensor([example[name] for example in examples])
        for name in self.needs.optional_fields:
            if _present(examples, name):
                batch[name] = torch.tensor([example[name] for example in examples])
        for spec in self.needs.lists:  # text lists are for tokenization; a list prepare_data consumed is absent
            if spec.dtype != "text" and _present(examples, spec.name):
                dtype = torch.long if spec.dtype == "int" else torch.float32
                batch[spec.name], batch[f"{spec.name}_mask"] = _pad_lists(
                    [example[spec.name] for example in examples], spec.pad, dtype)
        for name, values in compact.items():
            batch[name] = self._scatter(batch, values)
        if self.share is not None:
            pad_token_id, num_sequences, pack = self.share
            batch[sharing.SHARED] = sharing.share_prefixes(batch, pad_token_id, num_sequences, pack=pack).tensors()
        return batch

    @staticmethod
    def _scatter(batch: dict[str, Any], per_example: list[list[list]]) -> torch.Tensor:
        """Per example, per real sequence, per scored token a value (or a list of ``k``: top-k columns) ->
        ``[N, T]`` (``[N, T, k]``) on the rows' shifted completion mask; integer columns (token ids) are ``-1``
        elsewhere, float columns ``0``."""
        shift_mask = batch["completion_mask"][:, 1:].bool()
        size = len(per_example)
        slots = batch.get(SEQUENCE_SLOTS)
        places = slots.tolist() if slots is not None else range(shift_mask.size(0))
        flat = [value for slot in places for value in per_example[slot % size][slot // size]]
        values = torch.tensor(flat)
        if values.is_floating_point():
            values = values.float()
        if values.size(0) != int(shift_mask.sum()):
            raise RuntimeError("precomputed per-token values do not match the collated completion tokens")
        fill = 0 if values.is_floating_point() else -1
        out = values.new_full((*shift_mask.shape, *values.shape[1:]), fill)
        out[shift_mask] = values
        return out


def _present(examples: list[dict[str, Any]], name: str) -> bool:
    """Whether every example has column ``name`` (not ``None``); an error when only some have it."""
    present = [example.get(name) is not None for example in examples]
    if any(present) and not all(present):
        raise ValueError(f"column {name!r} is missing (None) in some examples of a batch: fill it in every row or "
                         "drop the column")  # fmt: skip
    return all(present)


#: The batch key of an online method's prompt rows (``PromptCollator``); the trainer's rollout stage replaces them
#: with the collated training rows it builds.
PROMPT_ROWS = "prompt_rows"


class PromptCollator:
    """The data loader's collator for an online method (``Needs.rollout``): prompts only, passed through as rows —
    ``{"prompt_rows": [{"prompt_ids", "prompt", "columns": {...}}, ...]}`` — for the trainer's rollout stage to sample
    from (``trl_plus.trainers.rollout``). ``columns`` are the data columns the rollout's scorers and sources read."""

    def __init__(self, columns: tuple[str, ...] = ()):
        self.columns = columns

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [{"prompt_ids": list(e["prompt_ids"]), "prompt": e.get("prompt"),
                 "columns": {c: e[c] for c in self.columns if c in e}} for e in examples]  # fmt: skip
        return {PROMPT_ROWS: rows}


def method_collator(method: Method, pad_token_id: int, max_length: int | None, truncation_mode: str) -> Callable:
    """The collator a method trains with: its own (:meth:`Method.collator`), or the core's default when that returns
    ``None`` (:class:`PairwiseCollator`), wrapped in :class:`FieldCollation` for the method's fields."""
    collator = method.collator(pad_token_id, max_length, truncation_mode)
    if collator is None:
        collator = PairwiseCollator(pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode)
    return FieldCollation(collator, method.needs)
