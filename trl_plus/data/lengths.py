"""What ``max_length`` does to a dataset: which sequences the collator cuts, how many prompt and completion tokens
each side loses, and which examples TRL drops before training. The trainer says it once before the first step;
``trl-plus validate`` says it before any model loads (lengths need only the tokenizer).

A collator takes part by having ``sequences(example) -> [(token ids, score mask), ...]``: the ``K`` sequences it
builds for one example before truncation (both core collators have it); ``side_names`` names them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Sequences = Callable[[dict[str, Any]], list[tuple[list[int], list[int]]]]


def cut(length: int, max_length: int | None, truncation_mode: str) -> slice:
    """The slice of a ``length``-token sequence that truncation removes (empty when it fits)."""
    if max_length is None or length <= max_length:
        return slice(0, 0)
    return slice(max_length, None) if truncation_mode == "keep_start" else slice(None, length - max_length)


@dataclass
class TruncationReport:
    """Per side (sequence ``k`` of every example): how many sequences truncation cuts and the tokens they lose."""

    max_length: int | None
    truncation_mode: str
    sides: tuple[str, ...]
    examples: int = 0
    cut_sequences: list[int] = field(default_factory=list)
    prompt_tokens_lost: list[int] = field(default_factory=list)  # unscored tokens (mask 0)
    completion_tokens_lost: list[int] = field(default_factory=list)  # scored tokens (mask 1)
    no_scored_token: int = 0  # examples with a sequence left without any scored token

    @property
    def any(self) -> bool:
        """Whether truncation cuts anything."""
        return any(self.cut_sequences)

    def add(self, sequences: list[tuple[list[int], list[int]]]) -> None:
        """Count one example's sequences (``(ids, score mask, ...)`` each; examples may have different counts)."""
        for counts in (self.cut_sequences, self.prompt_tokens_lost, self.completion_tokens_lost):
            counts.extend([0] * (len(sequences) - len(counts)))
        if len(self.sides) < len(sequences):
            self.sides = (*self.sides, *(f"sequence {k}" for k in range(len(self.sides), len(sequences))))
        self.examples += 1
        empty = False
        for k, (ids, mask, *_) in enumerate(sequences):
            removed = cut(len(ids), self.max_length, self.truncation_mode)
            scored_lost = sum(mask[removed])
            lost = len(mask[removed])
            if lost:
                self.cut_sequences[k] += 1
                self.completion_tokens_lost[k] += scored_lost
                self.prompt_tokens_lost[k] += lost - scored_lost
            empty |= sum(mask) - scored_lost == 0
        self.no_scored_token += empty

    def summary(self, where: str) -> str:
        """One line: what truncation removes from ``where``'s sequences, side by side, and the fix."""
        parts = []
        for k, name in enumerate(self.sides[: len(self.cut_sequences)]):
            if self.cut_sequences[k]:
                parts.append(f"{name}: {self.cut_sequences[k]} of {self.examples} sequences lose "
                             f"{self.prompt_tokens_lost[k]} prompt and {self.completion_tokens_lost[k]} completion "
                             "tokens")  # fmt: skip
        empty = f"; {self.no_scored_token} examples keep no completion token" if self.no_scored_token else ""
        return (f"{where}: max_length {self.max_length} ({self.truncation_mode}) truncates {'; '.join(parts)}{empty}. "
                "If that is not intended, raise training.max_length, filter or shorten the data, or change "
                "training.truncation_mode")  # fmt: skip


def side_names(collator: Any, count: int) -> tuple[str, ...]:
    """The names of a collator's ``count`` sequences per example (``chosen``/``rejected`` for pairs)."""
    names = tuple(getattr(collator, "side_names", ()) or ())
    return names if len(names) >= count else tuple(f"sequence {k}" for k in range(count))


def truncation_report(collator: Any, rows: Iterable[dict[str, Any]], max_length: int | None,
                      truncation_mode: str) -> TruncationReport | None:  # fmt: skip
    """What truncation to ``max_length`` removes from ``rows`` (tokenized examples) as ``collator`` builds them;
    ``None`` when the collator cannot say (it has no ``sequences``) or nothing is truncated (``max_length`` None)."""
    sequences = getattr(collator, "sequences", None)
    if sequences is None or max_length is None:
        return None
    report = None
    for row in rows:
        built = sequences(row)
        if report is None:
            report = TruncationReport(max_length, truncation_mode, side_names(collator, len(built)))
        report.add(built)
    return report


def fully_truncated(prompt_lengths: Iterable[int], max_length: int | None, truncation_mode: str) -> int:
    """How many examples TRL's pairwise tokenization drops before training: with ``keep_start``, those whose prompt
    alone fills ``max_length`` (no completion token would be left)."""
    if max_length is None or truncation_mode != "keep_start":
        return 0
    return sum(length >= max_length for length in prompt_lengths)


def dropped_message(dropped: int, total: int, max_length: int | None, where: str) -> str:
    """One line: ``dropped`` of ``total`` examples are dropped because their prompt fills ``max_length``; the fix."""
    return (f"{where}: {dropped} of {total} examples are dropped before training: their prompt alone fills "
            f"max_length {max_length} (truncation_mode keep_start would leave no completion token). Raise "
            "training.max_length, shorten the prompts, or set training.truncation_mode: keep_end")  # fmt: skip


def rows_of(dataset, columns: Iterable[str], batch_size: int = 1000):
    """The rows of a map-style ``datasets.Dataset``, reading only ``columns`` (fast: no text columns decoded)."""
    columns = [c for c in columns if c in dataset.column_names]
    for batch in dataset.select_columns(columns).iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))
