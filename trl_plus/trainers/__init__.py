"""Trainers, one per trainer kind (``Method.trainer``). ``preference`` is :class:`~trl_plus.PlusTrainer` (TRL's
``DPOTrainer``); ``diffusion`` is :class:`~trl_plus.diffusion.trainer.DiffusionTrainer` (``transformers.Trainer``
on a diffusers denoiser, the optional extra ``trl-plus[diffusion]``); ``group`` is
:class:`~trl_plus.trainers.group.PlusGRPOTrainer` (TRL's ``GRPOTrainer``, for :class:`~trl_plus.GroupMethod` s).

Light at import: :func:`trainer_class` imports a trainer (torch, TRL) only when asked for it.
"""

from __future__ import annotations

import importlib

from ..errors import TrlPlusError

#: Trainer kind -> ``module:class``. A new kind is one row here, never a branch over methods.
TRAINER_KINDS = {
    "preference": "trl_plus.trainers.preference:PlusTrainer",
    "diffusion": "trl_plus.diffusion.trainer:DiffusionTrainer",
    "group": "trl_plus.trainers.group:PlusGRPOTrainer",
}
#: Trainer kind -> (the module it needs beyond the core's dependencies, the install line of the optional extra).
TRAINER_EXTRAS = {"diffusion": ("diffusers", 'pip install "trl-plus[diffusion]"')}


def check_trainer_kind(method) -> None:
    """An error naming the method and the kinds this trl-plus has, when ``method.trainer`` is not one of them."""
    if method.trainer not in TRAINER_KINDS:
        raise TrlPlusError(
            f"method {method.name!r} runs on a {method.trainer!r} trainer, which this trl-plus does not have "
            f"(it has: {', '.join(TRAINER_KINDS)}); upgrade trl-plus or the plugin"
        )
    if method.trainer in TRAINER_EXTRAS:
        import importlib.util

        module, install = TRAINER_EXTRAS[method.trainer]
        if importlib.util.find_spec(module) is None:
            raise TrlPlusError(f"method {method.name!r} runs on the {method.trainer} trainer, which needs the optional "
                               f"extra trl-plus[{method.trainer}] ({module}): {install}")  # fmt: skip


def resolve_method(method, method_args=None):
    """A method instance from a registry name, a :class:`~trl_plus.Method` class or an instance (``method_args`` fill
    its config)."""
    from ..contract import Method
    from ..registry import get_method

    if isinstance(method, Method):
        if method_args:
            raise ValueError("pass method_args only with a method name or class")
        return method
    cls = get_method(method) if isinstance(method, str) else method
    return cls(dict(method_args or {}))


def trainer_class(method) -> type:
    """The trainer class that runs ``method`` (by its ``trainer`` kind; imported on first use)."""
    check_trainer_kind(method)
    module, _, name = TRAINER_KINDS[method.trainer].partition(":")
    return getattr(importlib.import_module(module), name)
