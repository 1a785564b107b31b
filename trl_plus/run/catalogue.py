"""What is installed, as data: one record per method (``trl-plus list --json``, ``show --json``), the README's
methods table (``trl-plus list --markdown``: the README's table is this output, checked by a test) and the plugin
distributions with the names each registers (``trl-plus plugins``). Light: no torch."""

from __future__ import annotations

import dataclasses
import typing
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..contract import Method
from ..registry import Registry

BUILT_IN = "trl-plus (built-in)"


def type_name(annotation: Any) -> str:
    """A hyperparameter's type as a user reads it: ``float``, ``sigmoid|ipo|hinge``, ``int | None``."""
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def method_record(cls: type[Method], source: str) -> dict[str, Any]:
    """Everything ``trl-plus show`` says about a method, as JSON-ready data."""
    return {
        "name": cls.name,
        "summary": cls.summary,
        "family": cls.family,
        "trainer": cls.trainer,
        "paper": dataclasses.asdict(cls.paper),
        "needs": dataclasses.asdict(cls.needs),
        "data_columns": list(cls.required_columns()),
        "sequences_per_example": cls.sequences_per_example,
        "hyperparameters": [
            {"name": name, "type": type_name(field.annotation), "required": field.is_required(),
             "default": None if field.is_required() else field.default, "description": field.description or ""}
            for name, field in cls.Config.model_fields.items()
        ],  # fmt: skip
        "source": source,
    }


def _plugin_folder(source: str) -> str | None:
    """``trl-plus-simpo (simpo)`` -> ``simpo``: the entry-point name, which is the plugin's folder in this repo."""
    return None if source == BUILT_IN else source.rsplit("(", 1)[-1].rstrip(")")


def ordered(registry: Registry) -> list[tuple[str, type[Method]]]:
    """The methods in catalogue order: the core's first, then the plugins', each by name."""
    return sorted(registry.methods.items(), key=lambda item: (registry.sources[item[0]] != BUILT_IN, item[0]))


def methods_markdown(registry: Registry) -> str:
    """The README's methods table: method, family, needs, paper (title and arXiv id), where it comes from."""
    lines = ["| method | family | needs | paper | plugin |", "|---|---|---|---|---|"]
    for name, cls in ordered(registry):
        folder = _plugin_folder(registry.sources[name])
        where = "built into the core" if folder is None else f"[plugins/{folder}](plugins/{folder})"
        lines.append(f"| `{name}` | {cls.family} | {cls.needs.describe()} | {cls.paper.title} ({cls.paper.where}) "
                     f"| {where} |")  # fmt: skip
    return "\n".join(lines)


def plugin_records(registry: Registry) -> list[dict[str, Any]]:
    """The installed plugin distributions (the core's own first): version, entry point, the methods, model aliases
    and commands each registers, and the error of any that failed to import."""
    plugins: dict[str, dict[str, Any]] = {}

    def record(source: str) -> dict[str, Any]:
        if source not in plugins:
            dist = "trl-plus" if source == BUILT_IN else source.split(" (")[0]
            try:
                dist_version = version(dist)
            except PackageNotFoundError:
                dist_version = None
            plugins[source] = {"distribution": dist, "version": dist_version, "entry_point": _plugin_folder(source),
                               "methods": [], "model_aliases": [], "commands": [], "error": None}  # fmt: skip
        return plugins[source]

    record(BUILT_IN)
    for name, source in sorted(registry.sources.items()):
        record(source)["methods"].append(name)
    for alias in registry.aliases.values():  # an alias's source is the plugin that registered it
        record(alias.source)["model_aliases"].append(alias.name)
    for command in registry.commands.values():
        record(command.source)["commands"].append(command.name)
    for broken in registry.broken.values():
        record(broken.source)["error"] = broken.error
    return sorted(plugins.values(), key=lambda p: (p["entry_point"] is not None, p["distribution"]))
