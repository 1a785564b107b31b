"""``trl-plus new NAME``: the scaffold follows the pattern every repository plugin has (tests/test_meta.py), its
method registers through its own hook, ``trl-plus show`` and the recipe work, its tests run with the loss tests as
strict xfails; bad or taken names and existing files are one-line errors that write nothing."""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from trl_plus.registry import get_registry
from trl_plus.testing import cli

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"cpo-lite": ["--reference-free"], "odd-po2": ["--family", "offline-listwise"]}


@pytest.fixture
def repo(tmp_path):
    """A scratch repository root holding only what the generated recipe reads: the quickstart pairs."""
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    for name in ("quickstart_prefs.jsonl", "quickstart_prefs_eval.jsonl"):
        shutil.copy(ROOT / "recipes" / "data" / name, tmp_path / "recipes" / "data")
    return tmp_path


def new(repo: Path, name: str, *options: str) -> int:
    return cli("new", name, *options, "--root", str(repo))


def module_name(name: str) -> str:
    return "trl_plus_" + name.replace("-", "_")


@contextlib.contextmanager
def installed(repo: Path, name: str, monkeypatch):
    """Import the generated module from its folder and add it to the registry as its entry point would."""
    monkeypatch.syspath_prepend(str(repo / "plugins" / name))
    monkeypatch.delitem(sys.modules, module_name(name), raising=False)
    module = importlib.import_module(module_name(name))
    registry = get_registry()
    registry.add_plugin(module, name=name, source=f"trl-plus-{name} ({name})")
    try:
        yield module
    finally:
        registry.remove_plugin(name)


def key_paths(table: dict, prefix: str = "") -> set[str]:
    """``project.entry-points.trl_plus``, ...: the dotted keys of a TOML document (entry-point names left out)."""
    keys = set()
    for key, value in table.items():
        path = f"{prefix}{key}"
        keys |= key_paths(value, path + ".") if isinstance(value, dict) and key != "trl_plus" else {path}
    return keys


@pytest.mark.parametrize("name", VARIANTS)
def test_writes_a_plugin_in_the_repository_pattern(repo, name, capsys):
    assert new(repo, name, *VARIANTS[name]) == 0
    module, plugin = module_name(name), repo / "plugins" / name
    written = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and "data" not in p.parts)
    assert written == sorted([f"plugins/{name}/pyproject.toml", f"plugins/{name}/{module}.py",
                              f"plugins/{name}/README.md", f"plugins/{name}/tests/test_{module[9:]}.py",
                              f"recipes/{name}.yaml"])  # fmt: skip
    out = capsys.readouterr().out
    assert all(f"wrote {repo / path}" in out for path in written)
    for step in (f"pip install -e {plugin}", f"trl-plus show {name}", f"python -m pytest {plugin}",
                 f"add {name!r} to REPOSITORY_PLUGINS", "trl-plus list --markdown"):  # fmt: skip
        assert step in out

    # what tests/test_meta.py asks of every plugin distribution
    meta = tomllib.loads((plugin / "pyproject.toml").read_text())
    assert meta["project"]["name"] == f"trl-plus-{name}"
    assert meta["project"]["entry-points"]["trl_plus"] == {name: module}
    assert meta["tool"]["setuptools"]["py-modules"] == [module]
    assert (plugin / f"{module}.py").exists() and list(plugin.glob("tests/test_*.py"))
    assert len((plugin / "README.md").read_text()) > 500
    # ... and exactly the tables and keys (and build settings) the repository's plugins have
    for existing in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        theirs = tomllib.loads(existing.read_text())
        assert key_paths(meta) == key_paths(theirs), existing
        assert meta["build-system"] == theirs["build-system"]
        # a plugin may build on another plugin (sail on tgdpo) and a diffusion plugin asks for the core's optional
        # extra (trl-plus[diffusion]); the core is the one dependency they all have
        assert meta["project"]["dependencies"] == ["trl-plus"]
        assert "trl-plus" in [d.split("[")[0] for d in theirs["project"]["dependencies"]]

    readme = (plugin / "README.md").read_text()
    for part in ("**Paper**", "## Objective", "## Hyperparameters", "| `beta` | 0.1 |", "## Deviations", "## Data",
                 f"trl-plus show {name}\n", f"trl-plus train recipes/{name}.yaml", "## Tests",
                 "strict xfail turns an implemented loss into a failure that says to remove the marker"):  # fmt: skip
        assert part in readme, part

    # tests/test_layers.py: a plugin imports only trl_plus and trl_plus.testing
    for path in plugin.rglob("*.py"):
        imported = [n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)]
        assert {m for m in imported if m.startswith("trl_plus")} <= {"trl_plus", "trl_plus.testing", module}


@pytest.mark.parametrize("name", VARIANTS)
def test_the_method_registers_shows_and_its_recipe_validates(repo, name, monkeypatch, capsys):
    new(repo, name, *VARIANTS[name])
    capsys.readouterr()
    with installed(repo, name, monkeypatch) as module:
        cls = get_registry().get(name)
        assert cls.__module__ == module.__name__ and cls.Config().beta == 0.1
        assert cls.needs.reference == ("no" if "--reference-free" in VARIANTS[name] else "yes")
        assert cls.family == ("offline-listwise" if name == "odd-po2" else "offline-pairwise")
        assert (cls.paper.title, cls.paper.arxiv) == ("TODO: title", "TODO: arXiv id")
        with pytest.raises(NotImplementedError, match=f"trl-plus-{name}: implement loss().*CONTRIBUTING.md"):
            cls().loss(None)

        assert cli("show", name) == 0
        out = capsys.readouterr().out
        assert f"from:    trl-plus-{name} ({name})" in out and "beta" in out and "0.1" in out
        assert cli("validate", str(repo / "recipes" / f"{name}.yaml")) == 0
        assert f"ok (method {name}" in capsys.readouterr().out
    assert name not in get_registry().methods


def test_the_generated_tests_run_and_the_loss_tests_xfail(repo):
    for name, options in VARIANTS.items():
        new(repo, name, *options)
    folders = [str(repo / "plugins" / name) for name in VARIANTS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*folders, str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def pytest_run(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", *args],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip

    proc = pytest_run(*folders)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed, 6 xfailed" in proc.stdout

    # once loss() is implemented, the strict xfail fails and says to remove the marker (what the README says)
    path = repo / "plugins" / "odd-po2" / f"{module_name('odd-po2')}.py"
    source = path.read_text()
    start, end = source.index("        raise NotImplementedError("), source.index("@hookimpl")
    path.write_text(source[:start] + (
        "        r = self.config.beta * (ctx.logps() - ctx.ref_logps())\n"
        "        return LossOutput(-(r[0] - r[1]).sigmoid().log().mean(), rewards=r.detach())\n\n\n"
    ) + source[end:])  # fmt: skip
    proc = pytest_run(folders[1], "-k", "gradient_signs", "-rX")
    assert proc.returncode == 1 and "[XPASS(strict)] implement loss(), then remove this marker" in proc.stdout


@pytest.mark.parametrize("name, message", [
    ("CPO", "use lowercase letters, digits and dashes, starting with a letter"),
    ("1po", "starting with a letter"),
    ("my_po", "starting with a letter"),
    ("my--po", "starting with a letter"),
    ("dpo", "method name 'dpo' is taken: trl-plus (built-in) registers it"),
    ("method", "its class Method would shadow"),
])  # fmt: skip
def test_a_bad_or_taken_name_is_one_line_and_writes_nothing(repo, name, message, capsys):
    assert new(repo, name) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (repo / "plugins").exists() and not list(repo.glob("recipes/*.yaml"))


@pytest.mark.parametrize("existing", ["plugins/cpo-lite", "recipes/cpo-lite.yaml"])
def test_an_existing_plugin_or_recipe_is_never_overwritten(repo, existing, capsys):
    (repo / existing).parent.mkdir(parents=True, exist_ok=True)
    (repo / existing).mkdir() if existing.startswith("plugins") else (repo / existing).write_text("mine\n")
    assert new(repo, "cpo-lite") == 2
    err = capsys.readouterr().err
    assert err == f"error: {repo / existing} already exists; not overwriting it (choose another name or remove it)\n"
    assert not (repo / "plugins" / "cpo-lite" / "pyproject.toml").exists()
    assert not (repo / "recipes" / "cpo-lite.yaml").exists() or (repo / existing).read_text() == "mine\n"


def test_a_missing_root_is_one_line(tmp_path, capsys):
    assert cli("new", "cpo-lite", "--root", str(tmp_path / "nowhere")) == 2
    assert capsys.readouterr().err == f"error: --root {tmp_path / 'nowhere'}: no such directory\n"
