"""Data: loading files and hub datasets (``load``), tokenizing (``tokenize``), collating (``collate``).

Plugins import these names from ``trl_plus``; the old paths ``trl_plus.data.tokenize_completions`` (and
``load_preferences``, ``check_columns``, ``looks_local``) still work until 0.3 with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {"tokenize_completions": "tokenize", "load_preferences": "load", "check_columns": "load",
          "looks_local": "load"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        new = "trl_plus" if name == "tokenize_completions" else f"trl_plus.data.{_MOVED[name]}"
        warnings.warn(f"trl_plus.data.{name} moved: import {name} from {new} (the old path goes in trl-plus 0.3)",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        return getattr(importlib.import_module(f"{__name__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
