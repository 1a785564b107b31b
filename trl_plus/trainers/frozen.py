"""Frozen-model sources shared by every trainer: the reference-mode rules (the one copy: ``trl-plus validate``
and the trainers both call :func:`resolve_reference_mode`) and the name of precomputed reference columns
(:class:`trl_plus.data.collate.FieldCollation` collates them).

Light at import (no torch): validation imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..contract import Method
from ..errors import TrlPlusError

REFERENCE_MODES = ("auto", "model", "adapter", "precomputed", "none")
#: The dataset column (and batch key) holding precomputed reference per-token log-probs (one of
#: ``FieldCollation.token_columns``).
REF_COLUMN = "ref_token_logps"
#: Output kinds read from a source's final hidden states at every step (never precomputed: ``[M, V]`` per step).
HIDDEN_KINDS = ("logits", "hidden_states")


def resolve_reference_mode(method: Method, mode: str, is_peft: bool, has_ref_model: bool,
                           iterated: bool = False) -> str:  # fmt: skip
    """The concrete reference mode (``model``, ``adapter``, ``precomputed`` or ``none``) for a method and setup.
    ``iterated``: the run's rows are fixed within each iteration (an ``iterations:`` block), so an online method's
    reference may be precomputed per iteration."""
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
    if mode == "precomputed" and not method.needs.precomputable_reference and not iterated:
        raise TrlPlusError(
            f"reference.mode: method {method.name!r} changes its sequences at every step, so reference log-probs "
            "precomputed before training cannot match them; use auto, model or adapter"
        )
    if mode == "adapter" and not is_peft:
        raise TrlPlusError("reference.mode: 'adapter' needs model.lora (LoRA on the policy); use 'model' or 'auto'")
    return mode


@dataclass
class Teacher:
    """A named frozen source for ``PlusTrainer(teachers={name: ...})`` (a plain model there means ``Teacher(model)``).

    - ``model``: a separate frozen causal LM (or a zero-argument callable that loads it: with ``mode="precomputed"``
      it is called only when the column cache misses, so a cached run never loads the teacher);
    - ``adapter``: a LoRA adapter folder, loaded frozen onto the policy's own base (a PEFT policy): its bytes, not a
      second base; refused when the adapter's base model or vocabulary differs from the policy's;
    - ``mode``: ``"live"`` (a forward every step) or ``"precomputed"`` (one pass before training into cached columns:
      label log-probs and top-k only);
    - ``identity``: what names the weights in the column cache (the recipe path sets it from the files' digests);
      ``None``: a hash of the weights in memory.
    """

    model: Any = None
    adapter: str | None = None
    mode: Literal["live", "precomputed"] = "live"
    identity: str | None = None
