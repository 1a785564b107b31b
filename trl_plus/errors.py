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


#: Third-party log lines that tell a trl-plus user nothing they can act on: ``(logger, text in the message)``.
#: bitsandbytes cannot fetch an optional CPU kernel from the hub (it works without); transformers falls back from a
#: torchvision image processor to the PIL one when a diffusers pipeline module imports it (trl-plus never uses it).
KNOWN_NOISE = (
    ("bitsandbytes.backends.cpu.ops", ""),
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
)


def quiet_known_noise() -> None:
    """Drop the :data:`KNOWN_NOISE` log lines (the ``trl-plus`` command and ``python -m`` entry points call it)."""
    import logging

    for name, text in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not text:
            logger.setLevel(logging.ERROR)
        elif not any(getattr(f, "text", None) == text for f in logger.filters):
            logger.addFilter(_Without(text))


class _Without:
    """A logging filter dropping the records whose message contains ``text``."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()
