"""User-facing errors: one line that names the file, the field and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TrlPlusError(Exception):
    """An error caused by the user's input (recipe, data, method name, model path).

    The command prints its message on one line and exits non-zero; no traceback unless ``--debug``.
    """


def nearest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The up-to-``n`` names in ``choices`` closest to ``name`` (for "did you mean" hints)."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def did_you_mean(name: str, choices: Iterable[str], n: int = 1) -> str:
    """`` (did you mean x?)`` naming the ``n`` closest names, or the empty string when none is close."""
    close = nearest(name, choices, n=n)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
