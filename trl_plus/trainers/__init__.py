"""Trainers, one per trainer kind (``Method.trainer``). ``preference`` is :class:`~trl_plus.PlusTrainer` (TRL's
``DPOTrainer``); the online, group-RL and diffusion trainers will sit beside it, sharing ``frozen``.

Light at import: :func:`trainer_class` imports a trainer (torch, TRL) only when asked for it.
"""

from __future__ import annotations

import importlib

from ..errors import TrlPlusError

#: Trainer kind -> ``module:class``. A new kind is one row here, never a branch over methods.
TRAINER_KINDS = {"preference": "trl_plus.trainers.preference:PlusTrainer"}


def check_trainer_kind(method) -> None:
    """An error naming the method and the kinds this trl-plus has, when ``method.trainer`` is not one of them."""
    if method.trainer not in TRAINER_KINDS:
        raise TrlPlusError(
            f"method {method.name!r} runs on a {method.trainer!r} trainer, which this trl-plus does not have "
            f"(it has: {', '.join(TRAINER_KINDS)}); upgrade trl-plus or the plugin"
        )


def trainer_class(method) -> type:
    """The trainer class that runs ``method`` (by its ``trainer`` kind; imported on first use)."""
    check_trainer_kind(method)
    module, _, name = TRAINER_KINDS[method.trainer].partition(":")
    return getattr(importlib.import_module(module), name)
