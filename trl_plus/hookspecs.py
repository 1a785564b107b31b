"""The plugin contract of trl-plus: every hook a plugin can implement.

This module is the documentation of record. A plugin is a Python module listed under the entry-point group
``trl_plus`` (distribution ``trl-plus-<method>``, module ``trl_plus_<method>``, entry-point name = method name).
trl-plus imports it, registers it with pluggy, and calls the hooks below. The core's own methods (``dpo``) and
model aliases are registered through the very same hooks (see ``trl_plus/builtins.py``).

Discovery order: the core's built-ins first, then installed entry points in the order ``importlib.metadata``
returns them. Set ``TRL_PLUS_PLUGINS=name1,name2`` to load only those entry points (``TRL_PLUS_PLUGINS=`` loads
none); a plugin that fails to import is recorded as broken and never hides the others.

A plugin module must keep its top-level imports light (``trl_plus`` and the standard library; import ``torch``
inside functions) so that ``trl-plus list`` and ``--help`` stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .method import Method, ModelAlias

hookspec = pluggy.HookspecMarker("trl_plus")
hookimpl = pluggy.HookimplMarker("trl_plus")


@hookspec
def register_methods(register: Callable[[type[Method]], None]) -> None:
    """Register preference-optimization methods.

    Called once per plugin when the registry loads. Call ``register(MethodClass)`` once per method, with a
    subclass of :class:`trl_plus.Method` (not an instance: trl-plus instantiates it with the validated
    ``method_args`` of a recipe). Registering a name twice, from the same or another plugin, is an error that
    names both sources. The return value is ignored.

    Example::

        from trl_plus import Method, hookimpl

        class MyMethod(Method):
            name = "my-method"
            ...

        @hookimpl
        def register_methods(register):
            register(MyMethod)
    """


@hookspec
def register_model_aliases(register: Callable[[ModelAlias], None]) -> None:
    """Register short model names usable as ``model.name_or_path`` in a recipe.

    Call ``register(ModelAlias(name, description, build))`` where ``build(cache_dir: pathlib.Path) -> str``
    returns a local directory that ``from_pretrained`` can load (it may create it on first use and reuse it
    afterwards). Duplicate alias names are an error. The return value is ignored.
    """
