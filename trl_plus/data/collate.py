"""Data collators. The core's default is TRL's pairwise collator plus the method's extra per-example fields
(:class:`PairwiseCollator`); :class:`SequencesCollator` serves methods with other shapes (one sequence, six, a
prompt per side)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

if TYPE_CHECKING:
    from ..contract import Method

#: Batch key: how many of the batch's sequences ``max_length`` cut (the trainer logs the fraction as ``truncated``).
TRUNCATED = "num_truncated"


@dataclass
class PairwiseCollator(DataCollatorForPreference):
    """TRL's ``DataCollatorForPreference`` (``[chosen_1..B, rejected_1..B]``, right-padded, completion mask),
    which also stacks the numeric per-example fields named in ``extra_fields`` into ``[B]`` (or ``[B, ...]``)
    tensors, as well as the ``optional_fields`` present in the examples (all of them or none), and passes
    precomputed reference columns through."""

    extra_fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()
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
        for name in self.extra_fields:
            batch[name] = torch.tensor([example[name] for example in examples])
        for name in self.optional_fields:
            present = [example.get(name) is not None for example in examples]
            if all(present):
                batch[name] = torch.tensor([example[name] for example in examples])
            elif any(present):
                raise ValueError(f"column {name!r} is missing (None) in some examples of a batch: fill it in every row "
                                 "or drop the column")
        return batch


def prompt_completion(prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int]]:
    """One sequence for :class:`SequencesCollator`: ``prompt + completion`` ids and a mask scoring the completion."""
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


class SequencesCollator:
    """Any number of sequences per example: ``sequences(example)`` returns the example's ``K`` sequences as
    ``(token ids, score mask)`` pairs (see :func:`prompt_completion`); the batch is ``[K*B, L]``, sequence-major
    (``[seq0_ex1..seq0_exB, seq1_ex1..]``), right-padded, each sequence cut to ``max_length`` from the end
    (``keep_start``) or the start (``keep_end``) like TRL's preference collator, with ``completion_mask`` = the
    score mask. ``side_names`` names the ``K`` sequences in the truncation report (default ``sequence k``)."""

    def __init__(
        self,
        sequences: Callable[[dict[str, Any]], list[tuple[list[int], list[int]]]],
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

        per_example = [self.sequences(example) for example in examples]
        ids, scored = [], []
        for k in range(len(per_example[0])):
            for sequences in per_example:
                tokens, mask = sequences[k]
                ids.append(torch.tensor(tokens[self.window]))
                scored.append(torch.tensor(mask[self.window]))
        batch = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, padding_side="right"),
            "attention_mask": pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="right"),
            "completion_mask": pad(scored, padding_value=0, padding_side="right"),
        }
        if self.max_length is not None:
            full = [len(sequences[k][0]) for k in range(len(per_example[0])) for sequences in per_example]
            batch[TRUNCATED] = torch.tensor(sum(n > self.max_length for n in full))
        return batch


def method_collator(method: Method, pad_token_id: int, max_length: int | None, truncation_mode: str) -> Callable:
    """The collator a method trains with: its own (:meth:`Method.collator`), or the core's default when that returns
    ``None``: :class:`PairwiseCollator` with the method's ``needs.fields`` and ``needs.optional_fields``."""
    collator = method.collator(pad_token_id, max_length, truncation_mode)
    if collator is None:
        collator = PairwiseCollator(
            pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode,
            extra_fields=method.needs.fields, optional_fields=method.needs.optional_fields,
        )  # fmt: skip
    return collator
