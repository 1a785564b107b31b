"""Named LoRA adapters on the policy: switching the active one for a forward pass without touching
``requires_grad``, and copying one into another.

peft's ``set_adapter`` (and so TRL's ``use_adapter``) turns ``requires_grad`` off on every inactive adapter and on
for the active one; switched around a reference forward, that leaves the trainable adapter frozen inside the
context, and any adapter not active at ``backward()`` silently gets no gradient. :func:`active_adapter` only sets
which adapter the LoRA layers apply.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

#: The frozen adapter the reference forward uses when the policy has it (a refreshed reference, see
#: ``PlusTrainer.refresh_reference``).
REFERENCE_ADAPTER = "ref"


def _tuner_layers(model: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def active_adapter(model: Any, name: str) -> Iterator[None]:
    """Inside the block the PEFT ``model``'s LoRA layers apply adapter ``name``; ``requires_grad`` is left as it is."""
    layers = _tuner_layers(model)
    before = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = name
    try:
        yield
    finally:
        for layer, previous in zip(layers, before):
            layer._active_adapter = previous


def copy_adapter(model: Any, source: str, target: str) -> None:
    """Adapter ``target`` of the PEFT ``model`` becomes a frozen copy of adapter ``source`` (created with the same
    config when missing)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if target not in model.peft_config:
        model.add_adapter(target, copy.deepcopy(model.peft_config[source]))
    set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=source), adapter_name=target)
    for name, parameter in model.named_parameters():
        if f".{target}." in name:
            parameter.requires_grad_(False)
