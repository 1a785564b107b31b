"""Frozen-model sources shared by every trainer: the reference-mode rules (the one copy: ``trl-plus validate``
and the trainers both call :func:`resolve_reference_mode`) and precomputed reference columns.

Light at import (no torch): validation imports it.
"""

from __future__ import annotations

from ..contract import Method
from ..errors import TrlPlusError

REFERENCE_MODES = ("auto", "model", "adapter", "precomputed", "none")
#: The dataset column (and batch key) holding precomputed reference per-token log-probs.
REF_COLUMN = "ref_token_logps"


def resolve_reference_mode(method: Method, mode: str, is_peft: bool, has_ref_model: bool) -> str:
    """The concrete reference mode (``model``, ``adapter``, ``precomputed`` or ``none``) for a method and setup."""
    if mode not in REFERENCE_MODES:
        raise TrlPlusError(f"reference.mode: {mode!r} is not one of {', '.join(REFERENCE_MODES)}")
    need = method.needs.reference
    if need == "no":
        if mode not in ("auto", "none"):
            raise TrlPlusError(
                f"reference.mode: method {method.name!r} is reference-free; set reference.mode to auto or none"
            )
        return "none"
    if mode == "none":
        if need == "yes":
            raise TrlPlusError(f"reference.mode: method {method.name!r} needs a reference model; use auto")
        return "none"
    if mode == "auto":
        return "model" if has_ref_model or not is_peft else "adapter"
    if mode == "precomputed" and not method.needs.precomputable_reference:
        raise TrlPlusError(
            f"reference.mode: method {method.name!r} changes its sequences at every step, so reference log-probs "
            "precomputed before training cannot match them; use auto, model or adapter"
        )
    if mode == "adapter" and not is_peft:
        raise TrlPlusError("reference.mode: 'adapter' needs model.lora (LoRA on the policy); use 'model' or 'auto'")
    return mode


class ReferenceColumnCollator:
    """Wraps a method's collator: turns precomputed ``ref_token_logps`` lists back into a ``[K*B, T]`` tensor."""

    def __init__(self, collator, num_sequences: int):
        self.collator, self.num_sequences = collator, num_sequences

    def __call__(self, examples):
        import torch

        if REF_COLUMN not in examples[0]:
            return self.collator(examples)
        ref = [example.pop(REF_COLUMN) for example in examples]
        batch = self.collator(examples)
        shift_mask = batch["completion_mask"][:, 1:].bool()
        flat = [value for k in range(self.num_sequences) for seqs in ref for value in seqs[k]]
        values = torch.tensor(flat, dtype=torch.float32)
        if values.numel() != int(shift_mask.sum()):
            raise RuntimeError("precomputed reference log-probs do not match the collated completion tokens")
        batch[REF_COLUMN] = torch.zeros(shift_mask.shape).masked_scatter(shift_mask, values)
        return batch
