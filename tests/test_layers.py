"""The core's architecture as a test: no import cycle, every import points to the same or a lower layer, and
plugins use only the stable surface (``trl_plus`` and ``trl_plus.testing``).

Imports are read from the source (AST), function-local and ``TYPE_CHECKING`` ones included, so a cycle hidden by
a lazy import still fails here. The layer table is CONTRIBUTING's "Layers"; a new module gets a row in both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_plus"

#: Module (or package prefix) -> layer. A module imports only from its own layer or lower.
LAYERS = {
    "trl_plus._version": 0,
    "trl_plus.errors": 0,
    "trl_plus.contract": 1,
    "trl_plus.config": 1,
    "trl_plus.models.cache": 1,
    "trl_plus.models.tiny": 1,
    "trl_plus.registry": 2,
    "trl_plus.builtin": 2,
    "trl_plus.data": 2,
    "trl_plus.models.load": 2,
    "trl_plus.diffusion": 2,  # diffusion methods, image data, pipelines, the denoising scorer, tiny pipelines
    "trl_plus.diffusion.trainer": 3,  # DiffusionTrainer (trainer kind "diffusion")
    "trl_plus.trainers": 3,
    "trl_plus.trainers.guard": 3,  # atomic checkpoints, the NaN guard (a mixin of every trainer)
    "trl_plus.run": 4,
    "trl_plus.run.estimate": 4,  # `trl-plus estimate`: peak memory from the config alone (meta device)
    "trl_plus.cli": 5,
    "trl_plus.testing": 5,
    "trl_plus": 6,  # the public facade (__init__, __main__) and the deprecated import paths
    "trl_plus.methods": 6,
    "trl_plus.collators": 6,
}

#: Packages whose ``__init__`` only re-exports (a facade): importing a name from them is an edge to the module
#: that defines it, resolved by the test below.
STABLE_SURFACE = ("trl_plus", "trl_plus.testing")


def module_name(path: Path, root: Path) -> str:
    """``trl_plus/run/train.py`` -> ``trl_plus.run.train`` (``__init__.py`` names its package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (any depth, any branch).

    ``from . import x`` counts as an edge to ``pkg.x`` when that is a module, else to ``pkg``.
    """
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
            if not node.module:  # `from . import x` runs (and so imports) the package `.` itself
                targets.append(module)
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import trl_plus.run.train` -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> modules it imports`` within the package."""
    modules = core_modules(package)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int | None:
    """The layer of ``module``: the row of its longest prefix in :data:`LAYERS`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain of an acyclic graph (for the architecture summary)."""
    best: dict[str, list[str]] = {}

    def chain(v: str) -> list[str]:
        if v not in best:
            best[v] = [v] + max((chain(w) for w in graph[v]), key=len, default=[])
        return best[v]

    return max((chain(v) for v in graph), key=len)


GRAPH = import_graph()


def test_the_graph_sees_function_local_imports():
    # cli imports the run layer only inside its commands (to keep `list` and `--help` light): still edges
    assert "trl_plus.run.train" in GRAPH["trl_plus.cli"]
    assert "trl_plus.registry" in GRAPH["trl_plus.cli"]


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .c import g\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from .a import x\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.b", "pkg.c"]]
    (package / "__init__.py").write_text("from .d import x\n")  # `from . import b` in a imports pkg itself
    assert cycles(import_graph(package)) == [["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"]]


def test_no_import_cycle():
    assert cycles(GRAPH) == [], "import cycle(s) among trl_plus modules (function-local imports included)"


def test_every_module_has_a_layer():
    missing = [m for m in GRAPH if layer(m) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py and CONTRIBUTING: {missing}"


def test_every_import_points_to_the_same_or_a_lower_layer():
    upward = [
        f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
        for source, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if layer(target) > layer(source)
    ]
    assert not upward, "upward import(s):\n" + "\n".join(upward)


PLUGIN_FILES = sorted(p for p in ROOT.glob("plugins/*/**/*.py") if ".egg-info" not in str(p))


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_stable_surface(path):
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        bad += [n for n in names if n.startswith("trl_plus.") and n not in STABLE_SURFACE]
    assert not bad, f"{path.name} imports {bad}: import from trl_plus or trl_plus.testing only"


@pytest.mark.parametrize(
    "path, name",
    [("trl_plus.methods.dpo", "DPO"), ("trl_plus.methods.dpo", "DPOConfig"), ("trl_plus.methods.sft", "SFT"),
     ("trl_plus.collators", "SequencesCollator"), ("trl_plus.collators", "prompt_completion"),
     ("trl_plus.data", "tokenize_completions")],
)  # fmt: skip
def test_the_paths_contributing_documented_still_work_with_a_deprecation_warning(path, name, monkeypatch):
    import importlib
    import sys

    import trl_plus

    if path != "trl_plus.data":  # a shim module warns when it is first imported (trl_plus.data: at each access)
        monkeypatch.delitem(sys.modules, path, raising=False)
    with pytest.warns(DeprecationWarning, match=f"import .*{name}.* from trl_plus"):
        value = getattr(importlib.import_module(path), name)
    assert value is getattr(trl_plus, name)


def test_the_stable_surface_resolves_every_name_it_exports():
    import trl_plus
    import trl_plus.testing

    for module in (trl_plus, trl_plus.testing):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ names what it lacks: {missing}"


def test_the_version_is_one_number():
    import tomllib

    import trl_plus

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == trl_plus.__version__
