"""Named LoRA adapters on the policy: switching the active one for a forward pass (or all of them off) without
touching ``requires_grad``, copying one into another, combining several into one (Σ w·ΔW), and saving / loading
several trained ones together.

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
    """The LoRA layers and the ``modules_to_save`` wrappers of a PEFT ``model`` (both switch by ``_active_adapter``
    and ``_disable_adapters``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [module for module in model.modules() if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextlib.contextmanager
def _layers_set(model: Any, attribute: str, value: Any) -> Iterator[None]:
    layers = _tuner_layers(model)
    before = [getattr(layer, attribute) for layer in layers]
    for layer in layers:
        setattr(layer, attribute, value)
    try:
        yield
    finally:
        for layer, previous in zip(layers, before):
            setattr(layer, attribute, previous)


def active_adapter(model: Any, name: str) -> contextlib.AbstractContextManager:
    """Inside the block the PEFT ``model``'s LoRA layers (and ``modules_to_save`` copies) apply adapter ``name``;
    ``requires_grad`` is left as it is."""
    return _layers_set(model, "_active_adapter", name)


def adapters_off(model: Any) -> contextlib.AbstractContextManager:
    """Inside the block no adapter of the PEFT ``model`` applies (the base model: the reference of a LoRA run with
    several trained adapters). Unlike peft's ``disable_adapter``, whose exit re-activates the active adapter alone
    and so freezes every other one, it leaves ``requires_grad`` as it is."""
    return _layers_set(model, "_disable_adapters", True)


def reference_off(policy: Any, named: bool = False) -> contextlib.AbstractContextManager:
    """The context in which the PEFT ``policy`` is its own reference: the frozen ``ref`` adapter when it has one (a
    refreshed reference), else every adapter off — without touching ``requires_grad`` when it trains ``named``
    adapters (peft's ``disable_adapter``, TRL's ``use_adapter(None)``, would freeze all but the active one)."""
    if REFERENCE_ADAPTER in policy.peft_config:
        return active_adapter(policy, REFERENCE_ADAPTER)
    if named:
        return adapters_off(policy)
    from trl.trainer.utils import use_adapter

    return use_adapter(policy, adapter_name=None)


def adapter_parameters(model: Any, name: str) -> list[tuple[str, Any]]:
    """``(name, parameter)`` of adapter ``name``'s weights in the PEFT ``model`` (its LoRA matrices and its
    ``modules_to_save`` copies)."""
    return [(n, p) for n, p in model.named_parameters() if f".{name}." in n]


def add_trainable_adapters(model: Any, configs: dict[str, Any]) -> Any:
    """The causal LM ``model`` wrapped by PEFT with one trainable adapter per ``configs`` entry (name -> peft
    config, in order; the first is the active one), every adapter's weights left trainable (peft's ``add_adapter``
    freezes all but the active one)."""
    from peft import get_peft_model

    (first, config), *others = configs.items()
    model = get_peft_model(model, config, adapter_name=first)
    for name, other in others:
        model.add_adapter(name, other)
    for name in configs:
        for _, parameter in adapter_parameters(model, name):
            parameter.requires_grad_(True)
    return model


def trained_module(model: Any, name: str) -> Any:
    """The module called ``name`` (``objective_heads``, say) as the active adapter trains it: with LoRA, the
    adapter's ``modules_to_save`` copy (the original without an active copy); without, the module itself."""
    from peft.utils.other import ModulesToSaveWrapper

    for path, module in model.named_modules():
        if path == name or path.endswith("." + name):
            if isinstance(module, ModulesToSaveWrapper):
                active = module.active_adapters[0] if module.active_adapters else None
                if module.disable_adapters or active not in module.modules_to_save:
                    return module.original_module
                return module.modules_to_save[active]
            return module
    raise KeyError(f"the model has no module named {name!r}")


def combine(model: Any, names: list[str], weights: list[float], target: str, how: str = "cat") -> None:
    """Adapter ``target`` of the PEFT ``model`` (created, frozen) becomes a weighted combination of adapters
    ``names``.

    - ``how="cat"``: ΔW_target = Σ w_i·ΔW_i exactly, ΔW_i = s_i·B_i·A_i (s = alpha / r): the A matrices are stacked
      along the rank and the B matrices concatenated with their columns scaled by w_i·s_i (the target's scaling is 1,
      its rank Σ r_i). Not peft's ``add_weighted_adapter("linear")``, whose B·A has cross terms.
    - ``how="mean"``: per-tensor weighted average of the A and of the B matrices (Σ w_i A_i, Σ w_i B_i: a "linear
      combination of parameters" read literally); the adapters must have one rank and scaling.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    if len(names) != len(weights) or not names:
        raise ValueError(f"combine: {len(names)} adapters and {len(weights)} weights")
    if how not in ("cat", "mean"):
        raise ValueError(f"combine: how={how!r} is not one of cat, mean")
    configs = [model.peft_config[name] for name in names]
    config = copy.deepcopy(configs[0])
    if how == "cat":
        config.r = sum(c.r for c in configs)
        config.lora_alpha = config.r  # scaling 1: the sources' scalings go into B
        config.rank_pattern, config.alpha_pattern = {}, {}
    elif len({(c.r, c.lora_alpha) for c in configs}) > 1:
        raise ValueError("combine: how='mean' averages A and B per tensor, so the adapters need one r and alpha")
    if target in model.peft_config:
        model.delete_adapter(target)
    model.add_adapter(target, config)
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, LoraLayer) or target not in layer.lora_A:
                continue
            present = [(n, w) for n, w in zip(names, weights) if n in layer.lora_A]
            a = [layer.lora_A[n].weight for n, _ in present]
            b = [layer.lora_B[n].weight for n, _ in present]
            if how == "cat":
                stacked_a = torch.cat(a, 0) if a else None
                stacked_b = torch.cat([w * layer.scaling[n] * bi for (n, w), bi in zip(present, b)], 1) if b else None
            else:
                stacked_a = sum(w * ai for (_, w), ai in zip(present, a))
                stacked_b = sum(w * bi for (_, w), bi in zip(present, b))
            if stacked_a is None or stacked_a.shape != layer.lora_A[target].weight.shape:  # an adapter lacks it
                layer.lora_A[target].weight.zero_()
                layer.lora_B[target].weight.zero_()
                if stacked_a is not None:  # fewer sources here than in the config: pad the rank with zeros
                    layer.lora_A[target].weight[: stacked_a.size(0)] = stacked_a
                    layer.lora_B[target].weight[:, : stacked_b.size(1)] = stacked_b
                continue
            layer.lora_A[target].weight.copy_(stacked_a)
            layer.lora_B[target].weight.copy_(stacked_b)
    for _, parameter in adapter_parameters(model, target):
        parameter.requires_grad_(False)


def load_adapters(model: Any, folder: str, names: list[str]) -> None:
    """Load the weights of adapters ``names`` from a folder peft's ``save_pretrained(selected_adapters=names)`` wrote (``folder/<name>/``) into the PEFT ``model``'s
    adapters of the same names (``requires_grad`` left as it is: they keep training after a resume)."""
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in names:
        path = Path(folder) / name / "adapter_model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no adapter {name!r} ({path})")
        set_peft_model_state_dict(model, load_file(str(path)), adapter_name=name)


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


class TrainableAdapter:
    """A second trainable LoRA adapter on the policy's base with its own AdamW (OPRL's process reward model): made
    by ``PlusGRPOTrainer.add_trainable_adapter``, which saves it in every checkpoint and restores it on resume.

    It starts as a copy of adapter ``source`` (the policy's: a model initialised from the policy) and stays out of
    the policy's optimiser and DDP (``requires_grad`` off) except inside :meth:`training`, where it is the active
    adapter and the only one with gradients. Its forward and backward are its own (a mixed graph gives the
    adapter that is not active at ``backward()`` no gradient). Every process runs it on the same gathered batch,
    so the copies stay identical without an all-reduce.
    """

    def __init__(self, model: Any, name: str, *, lr: float, source: str = "default", weight_decay: float = 0.0,
                 max_grad_norm: float | None = 1.0) -> None:  # fmt: skip
        import torch

        copy_adapter(model, source, name)
        self.model, self.name, self.max_grad_norm = model, name, max_grad_norm
        self.parameters = [p for _, p in adapter_parameters(model, name)]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        self.steps = 0

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Inside: this adapter applies and has gradients; the others' ``requires_grad`` is off and restored."""
        others = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in others:
            p.requires_grad_(False)
        for p in self.parameters:
            p.requires_grad_(True)
        try:
            with active_adapter(self.model, self.name):
                yield
        finally:
            for p, flag in others:
                p.requires_grad_(flag)
            for p in self.parameters:
                p.requires_grad_(False)

    def step(self, loss: Any) -> float:
        """Backward ``loss`` (computed inside :meth:`training`), clip, one optimiser step; the gradient norm."""
        import torch

        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return float(norm)

    def save(self, folder: str) -> None:
        """Its weights and optimiser state under ``folder/trainable-<name>/``."""
        from pathlib import Path

        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        target = Path(folder) / f"trainable-{self.name}"
        target.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self.model, adapter_name=self.name)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(target / "adapter.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "steps": self.steps}, target / "optimizer.pt")

    def load(self, folder: str) -> None:
        """Restore what :meth:`save` wrote in ``folder``."""
        from pathlib import Path

        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        source = Path(folder) / f"trainable-{self.name}"
        if not (source / "adapter.safetensors").is_file():
            raise FileNotFoundError(f"{folder} holds no trainable adapter {self.name!r} ({source})")
        set_peft_model_state_dict(self.model, load_file(str(source / "adapter.safetensors")), adapter_name=self.name)
        state = torch.load(source / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
