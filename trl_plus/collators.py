"""Data collators. The default is TRL's pairwise collator plus the method's extra per-example fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference


@dataclass
class PairwiseCollator(DataCollatorForPreference):
    """TRL's ``DataCollatorForPreference`` (``[chosen_1..B, rejected_1..B]``, right-padded, completion mask),
    which also stacks the numeric per-example fields named in ``extra_fields`` into ``[B]`` (or ``[B, ...]``)
    tensors, as well as the ``optional_fields`` present in the examples (all of them or none), and passes
    precomputed reference columns through."""

    extra_fields: tuple[str, ...] = ()
    optional_fields: tuple[str, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
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
