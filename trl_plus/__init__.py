"""trl-plus: preference-optimization methods from the literature as plugins of one TRL trainer.

Light names (the plugin contract) import eagerly; the trainer and ``train`` load torch only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import TrlPlusError
from .hookspecs import hookimpl
from .method import LossContext, LossOutput, Method, MethodConfig, ModelAlias, Needs, Paper
from .registry import get_method, get_registry

__version__ = "0.1.0"

__all__ = [
    "LossContext", "LossOutput", "Method", "MethodConfig", "ModelAlias", "Needs", "Paper", "PlusTrainer",
    "TrlPlusError", "get_method", "get_registry", "hookimpl", "load_recipe", "train",
]  # fmt: skip

if TYPE_CHECKING:
    from .api import train
    from .recipe import load_recipe
    from .trainer import PlusTrainer

_LAZY = {"train": "api", "PlusTrainer": "trainer", "load_recipe": "recipe"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'trl_plus' has no attribute {name!r}")
