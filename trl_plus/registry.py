"""Discovers methods and model aliases: the core's built-ins and installed plugins, through the same hooks."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy

from .builtin import BuiltinPlugin
from .contract import Environment, Method, Metric, ModelAlias, Scorer
from .errors import TrlPlusError, did_you_mean

ENTRY_POINT_GROUP = "trl_plus"
#: The plugins in the trl-plus repository (``plugins/<name>``), for the install hint of an unknown method;
#: ``tests/test_meta.py`` keeps it equal to the folder.
REPOSITORY_PLUGINS = frozenset({
    "abc", "aligndistil", "asft", "brain", "curry-dpo", "dove", "dso-dro", "egida-safety", "flow-dpo", "flow-rwr",
    "inversion-dpo", "irpo", "is-daa", "ld-dpo", "ln-dpo", "mah-dpo", "modpo", "ofs-dpo", "rankdpo", "redi", "rpo",
    "sail", "simpo", "smpo", "srpo", "ssdpo", "tars", "tgdpo", "three-d-properties", "tracealign", "tvkd",
    "dporm-generalization", "r-to-q", "ranking-accuracy",  # metric plugins
    "did", "dpo-survey", "more-is-less", "sft-fdiv",  # issue 13 (c): metric plugins, the survey taxonomy, a method
    "selm", "dno", "dpa",  # issue 14: iterated online methods
    "online-dpo", "xpo",  # issue 14: online methods
    "disco", "drpo", "mo-grpo", "rto", "hybrid-offline-online", "oprl", "deep-research-survey",  # issue 15: group-RL methods, phases
    "densedpo", "ppd",  # issue 21: video latents, a user-conditioned branch
    "d3po", "spo", "diffusion-dro", "awm", "flow-nrg", "spro", "diff-uapa",  # issue 19: online and step-wise diffusion
})  # fmt: skip


@dataclass
class BrokenPlugin:
    """An installed plugin whose import (or registration) failed."""

    name: str
    source: str
    error: str  # "ExceptionType: message"
    traceback: str
    stage: str = "import"  # what failed: "import" (loading its module) or "register its methods" (its hooks)


@dataclass(frozen=True)
class PluginCommand:
    """A ``trl-plus`` subcommand a plugin added (the ``register_commands`` hook)."""

    name: str  # "sail localize": the first word groups a plugin's commands
    help: str
    add_arguments: Callable
    run: Callable
    source: str


#: The core's own commands: a plugin command may not take their names.
CORE_COMMANDS = frozenset({"list", "plugins", "show", "validate", "train", "estimate", "eval", "score", "compare",
                           "report", "merge", "new", "generate"})


class DuplicateRegistration(TrlPlusError):
    """Two plugins register the same method or alias name (both are named)."""

    def __init__(self, kind: str, name: str, sources: list[str]):
        super().__init__(f"{kind} {name!r} is registered twice: by {sources[0]} and by {sources[1]}")
        self.name, self.sources = name, sources


@dataclass
class Registry:
    """The methods and model aliases known to this process, and the plugins that failed to load."""

    methods: dict[str, type[Method]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # method name -> "trl-plus (built-in)" / distribution
    aliases: dict[str, ModelAlias] = field(default_factory=dict)
    broken: dict[str, BrokenPlugin] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # method name -> the two plugins that register it
    commands: dict[str, PluginCommand] = field(default_factory=dict)  # "sail localize" -> its command
    metrics: dict[str, type[Metric]] = field(default_factory=dict)
    scorers: dict[str, type[Scorer]] = field(default_factory=dict)
    environments: dict[str, type[Environment]] = field(default_factory=dict)
    component_sources: dict[tuple[str, str], str] = field(default_factory=dict)  # ("metric", name) -> its plugin
    plugin_manager: pluggy.PluginManager | None = None

    # -- registration ---------------------------------------------------------------------------------------
    def _register_method(self, method: type[Method], source: str) -> None:
        if not (isinstance(method, type) and issubclass(method, Method)):
            raise TypeError(f"{source}: register() expects a trl_plus.Method subclass, got {method!r}")
        for attr in ("name", "paper"):
            if not hasattr(method, attr):
                raise TypeError(f"{source}: method class {method.__name__} does not set `{attr}`")
        if method.name in self.methods:
            raise DuplicateRegistration("method", method.name, [self.sources[method.name], source])
        self.methods[method.name] = method
        self.sources[method.name] = source

    def _register_component(self, kind: str, cls: type, base: type, table: dict, source: str) -> None:
        """A metric or a scorer class (``kind``), checked like a method."""
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{source}: register() expects a trl_plus.{base.__name__} subclass, got {cls!r}")
        if not hasattr(cls, "name"):
            raise TypeError(f"{source}: {kind} class {cls.__name__} does not set `name`")
        if cls.name in table:
            raise DuplicateRegistration(kind, cls.name, [self.component_sources[kind, cls.name], source])
        table[cls.name] = cls
        self.component_sources[kind, cls.name] = source

    def _register_alias(self, alias: ModelAlias, source: str) -> None:
        if alias.name in self.aliases:
            raise TrlPlusError(f"model alias {alias.name!r} is registered twice: by {self.aliases[alias.name].source}"
                               f" and by {source}")
        self.aliases[alias.name] = ModelAlias(alias.name, alias.description, alias.build, source)

    def _register_command(self, name: str, help: str, add_arguments: Callable, run: Callable, source: str) -> None:
        words = name.split()
        if not 1 <= len(words) <= 2 or not all(w.replace("-", "").isalnum() for w in words):
            raise TypeError(f"{source}: a command name is one or two words of letters, digits and dashes, not {name!r}")
        if words[0] in CORE_COMMANDS:
            raise TrlPlusError(f"command {name!r} of {source} takes the name of the core's `trl-plus {words[0]}`")
        name = " ".join(words)
        clash = self.commands.get(name) or next((c for c in self.commands.values()
                                                if (len(c.name.split()) == 1) != (len(words) == 1)
                                                and c.name.split()[0] == words[0]), None)  # fmt: skip
        if clash is not None:
            raise DuplicateRegistration("command", name, [clash.source, source])
        self.commands[name] = PluginCommand(name, help, add_arguments, run, source)

    def add_plugin(self, plugin: object, name: str, source: str) -> None:
        """Register one plugin object (a module or an object with hook implementations) and run its hooks."""
        pm = self.plugin_manager
        pm.register(plugin, name=name)
        caller = pm.subset_hook_caller  # call this plugin's hooks only
        others = [p for p in pm.get_plugins() if p is not plugin]
        caller("register_methods", others)(register=lambda m: self._register_method(m, source))
        caller("register_model_aliases", others)(register=lambda a: self._register_alias(a, source))
        caller("register_commands", others)(
            register=lambda n, h, add, run: self._register_command(n, h, add, run, source))
        caller("register_metrics", others)(
            register=lambda m: self._register_component("metric", m, Metric, self.metrics, source))
        caller("register_scorers", others)(
            register=lambda m: self._register_component("scorer", m, Scorer, self.scorers, source))
        caller("register_environments", others)(
            register=lambda m: self._register_component("environment", m, Environment, self.environments, source))

    def remove_plugin(self, name: str) -> None:
        """Unregister a plugin and forget the methods and aliases it registered (used by tests)."""
        plugin = self.plugin_manager.get_plugin(name)
        if plugin is not None:
            self.plugin_manager.unregister(plugin)
        for method_name in [m for m, s in self.sources.items() if s == name or s.endswith(f"({name})")]:
            self.methods.pop(method_name, None)
            self.sources.pop(method_name, None)
        for alias in [a for a, v in self.aliases.items() if v.source == name or v.source.endswith(f"({name})")]:
            self.aliases.pop(alias)
        for command in [c for c, v in self.commands.items() if v.source == name or v.source.endswith(f"({name})")]:
            self.commands.pop(command)
        for kind, table in (("metric", self.metrics), ("scorer", self.scorers), ("environment", self.environments)):
            for key in [k for k, v in self.component_sources.items()
                        if k[0] == kind and (v == name or v.endswith(f"({name})"))]:  # fmt: skip
                table.pop(key[1], None)
                self.component_sources.pop(key)

    # -- lookup ---------------------------------------------------------------------------------------------
    def get(self, name: str) -> type[Method]:
        """The method class registered under ``name``; a clear error if it is unknown or its plugin is broken."""
        if name in self.conflicts:
            first, second = self.conflicts[name]
            raise TrlPlusError(f"method {name!r} is registered by two plugins, {first} and {second}: uninstall one "
                               "of them (`trl-plus plugins` lists what each registers)")  # fmt: skip
        if name in self.methods:
            return self.methods[name]
        if name in self.broken:
            b = self.broken[name]
            raise TrlPlusError(
                f"method {name!r} is installed ({b.source}) but its plugin failed to {b.stage}: {b.error}. "
                f"Fix or reinstall that plugin (`trl-plus list --debug` shows the traceback)."
            )
        known = sorted(self.methods) + sorted(self.broken)
        install = ""
        if name in REPOSITORY_PLUGINS:
            install = f" It is a plugin of the trl-plus repository: `pip install -e plugins/{name}` in a checkout."
        raise TrlPlusError(
            f"unknown method {name!r}{did_you_mean(name, known, n=3)}. "
            f"Installed: {', '.join(known) or 'none'} (`trl-plus list`).{install}"
        )


    def get_metric(self, name: str) -> type[Metric]:
        """The metric class registered under ``name``; an unknown name lists the nearest ones."""
        return self._component("metric", name, self.metrics, "trl-plus list --metrics")

    def get_scorer(self, name: str) -> type[Scorer]:
        """The scorer class registered under ``name``; an unknown name lists the nearest ones."""
        return self._component("scorer", name, self.scorers, "trl-plus list --scorers")

    def get_environment(self, name: str) -> type[Environment]:
        """The environment class registered under ``name``; an unknown name lists the nearest ones."""
        return self._component("environment", name, self.environments, "trl-plus list --environments")

    def _component(self, kind: str, name: str, table: dict, listing: str) -> type:
        if name in table:
            return table[name]
        if name in self.broken:
            b = self.broken[name]
            raise TrlPlusError(f"{kind} {name!r} is installed ({b.source}) but its plugin failed to {b.stage}: "
                               f"{b.error}")  # fmt: skip
        install = (f" It is a plugin of the trl-plus repository: `pip install -e plugins/{name}` in a checkout."
                   if name in REPOSITORY_PLUGINS else "")  # fmt: skip
        raise TrlPlusError(f"unknown {kind} {name!r}{did_you_mean(name, sorted(table), n=3)}. Installed: "
                           f"{', '.join(sorted(table)) or 'none'} (`{listing}`).{install}")  # fmt: skip


def _selected_entry_points():
    eps = entry_points(group=ENTRY_POINT_GROUP)
    wanted = os.environ.get("TRL_PLUS_PLUGINS")
    if wanted is None:
        return list(eps)
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return [ep for ep in eps if ep.name in names]


def load_registry() -> Registry:
    """Build a fresh registry: built-ins first, then every selected entry point of group ``trl_plus``."""
    pm = pluggy.PluginManager("trl_plus")
    pm.add_hookspecs(sys.modules[Method.__module__])  # the contract module: its hookspecs
    registry = Registry(plugin_manager=pm)
    registry.add_plugin(BuiltinPlugin(), name="trl-plus", source="trl-plus (built-in)")
    for ep in _selected_entry_points():
        dist = getattr(ep.dist, "name", None) or "?"
        source = f"{dist} ({ep.name})"
        stage = "import"
        try:
            plugin = ep.load()
            stage = "register its methods"
            registry.add_plugin(plugin, name=ep.name, source=source)
        except Exception as exc:  # a broken plugin must never hide the others
            if stage != "import":  # forget what it registered before it failed
                registry.remove_plugin(ep.name)
            if isinstance(exc, DuplicateRegistration) and exc.name in registry.methods:
                registry.conflicts[exc.name] = exc.sources
            registry.broken[ep.name] = BrokenPlugin(
                name=ep.name,
                source=source,
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
                stage=stage,
            )
    return registry


_REGISTRY: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = load_registry()
    return _REGISTRY


def get_method(name: str) -> type[Method]:
    """Shortcut for ``get_registry().get(name)``."""
    return get_registry().get(name)
