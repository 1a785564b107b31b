"""Meta-tests that keep the project's promises: every hook documented and exercised, every method with a
README row, a recipe that validates and a test; the CONTRIBUTING example runs; public names have docstrings."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import tomllib

import trl_plus
from trl_plus import contract
from trl_plus.config import load_recipe
from trl_plus.registry import get_registry
from trl_plus.run.validate import check_recipe

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))
RECIPES = sorted(ROOT.glob("recipes/*.yaml"))
QUICK_DATA = "recipes/data/quickstart_prefs.jsonl"


def hook_names():
    return [n for n, f in inspect.getmembers(contract, inspect.isfunction) if n.startswith("register_")]


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented_and_exercised(name):
    assert len(inspect.getdoc(getattr(contract, name)) or "") > 200
    used = [p for p in ROOT.glob("tests/*.py") if p.name != "test_meta.py" and name in p.read_text()]
    used += [p for p in ROOT.glob("trl_plus/**/*.py") if p.name != "contract.py" and f"def {name}" in p.read_text()]
    assert used, f"hook {name} is neither implemented by the core nor used by a test"


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_every_plugin_distribution_is_complete(plugin):
    meta = tomllib.loads((plugin / "pyproject.toml").read_text())
    entry_points = meta["project"]["entry-points"]["trl_plus"]
    module = "trl_plus_" + plugin.name.replace("-", "_")
    assert meta["project"]["name"] == f"trl-plus-{plugin.name}"
    assert entry_points == {plugin.name: module}
    assert (plugin / f"{module}.py").exists()
    assert len((plugin / "README.md").read_text()) > 500
    assert list(plugin.glob("tests/test_*.py"))
    registry = get_registry()
    commands = {c.source.rsplit(" (", 1)[-1].rstrip(")") for c in registry.commands.values()}  # "dist (name)"
    assert plugin.name in {**registry.methods, **registry.metrics} or plugin.name in commands, (
        f"{plugin.name} is not installed: pip install -e {plugin}")  # a method, a metric or (dpo-survey) commands
    # every plugin: a method's or a metric's run, or what a command plugin's commands feed (dpo-survey: compare)
    assert list(ROOT.glob(f"recipes/{plugin.name}*.yaml")), f"no recipes/{plugin.name}.yaml"


def _contributing_pyproject() -> dict:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    return tomllib.loads(re.search(r"```toml\n(.*?)```", text, re.S).group(1))


@pytest.mark.parametrize("project", [ROOT, *PLUGINS], ids=lambda p: "core" if p == ROOT else p.name)
def test_editable_install_is_quiet(project):
    """``pip install -e`` warns "Editable installation. Please be careful with folders in your working directory
    ..." whenever setuptools' ``editable_wheel`` installs an import finder; it writes a plain ``.pth`` entry, and
    says nothing, only when ``package-dir`` is exactly ``{"": folder}`` with the modules in that folder."""
    setuptools = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools.get("package-dir") == {"": "."}, f'{project}/pyproject.toml lacks package-dir = {{"" = "."}}'
    for module in setuptools.get("py-modules", []):
        assert (project / f"{module}.py").is_file()


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_plugin_packaging_is_contributings_example(plugin):
    example = _contributing_pyproject()
    meta = tomllib.loads((plugin / "pyproject.toml").read_text())
    module = "trl_plus_" + plugin.name.replace("-", "_")
    assert meta["build-system"] == example["build-system"]
    assert meta["tool"]["setuptools"] == {**example["tool"]["setuptools"], "py-modules": [module]}


def test_every_installed_method_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    for name in get_registry().methods:
        assert re.search(rf"^\| `{re.escape(name)}` \|", readme, re.M), f"README's method table lacks {name}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(recipe, tmp_path):
    parsed = load_recipe(recipe)
    overrides = []
    for split in ("train", "eval"):
        spec = getattr(parsed.data, split)
        if spec is not None and not Path(spec.path).exists():  # a user's data file: validate the rest
            overrides.append(f"data.{split}.path={QUICK_DATA}")
    for key, name, spec in parsed.teacher_blocks():  # a teacher adapter the user trains first: a stand-in folder
        if spec.adapter and not any((place / spec.adapter / "adapter_config.json").is_file()
                                    for place in (recipe.parent, Path.cwd())):  # fmt: skip
            (tmp_path / name).mkdir()
            (tmp_path / name / "adapter_config.json").write_text("{}")
            overrides.append(f"{key}.adapter={tmp_path / name}")
    check_recipe(load_recipe(recipe, overrides))


def test_every_method_has_a_recipe():
    names = {p.stem for p in RECIPES}
    for name in get_registry().methods:
        assert any(n == name or n.startswith(f"{name}-") for n in names), f"no recipes/{name}.yaml"


def _public_objects():
    for info in pkgutil.walk_packages(trl_plus.__path__, "trl_plus."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj


def test_public_names_have_docstrings():
    missing = [name for name, obj in _public_objects() if not inspect.getdoc(obj)]
    assert not missing, missing


def test_contributing_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "CONTRIBUTING.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    module_src = next(b for b in blocks if "@hookimpl" in b)
    test_src = next(b for b in blocks if "def test_" in b)
    (tmp_path / "trl_plus_cpo_lite.py").write_text(module_src)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("trl_plus_cpo_lite", None)
    namespace: dict = {}
    exec(compile(test_src, "CONTRIBUTING.md", "exec"), namespace)
    tests = [f for n, f in namespace.items() if n.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        params = inspect.signature(test).parameters
        test(**({"tmp_path": tmp_path / test.__name__} if "tmp_path" in params else {}))


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    """The README's "### Python" blocks run as written on a CPU, from the repository root; only their output
    directories (``runs/...``) are moved into ``tmp_path``."""
    section = (ROOT / "README.md").read_text().split("### Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    monkeypatch.chdir(ROOT)
    for i, block in enumerate(blocks):
        code = block.replace('"runs/', f'"{tmp_path}/').replace("=runs/", f"={tmp_path}/")
        assert code != block, "a snippet that writes outside runs/"
        exec(compile(code, f"README.md (### Python, block {i + 1})", "exec"), {})
    cards = list(tmp_path.glob("*/README.md"))  # what they wrote landed here, model cards included
    assert len(cards) == len(blocks) and all("fine-tuned version of `tiny-llama`" in c.read_text() for c in cards)


@pytest.mark.parametrize("name", sorted(get_registry().methods))
def test_show_lists_every_hyperparameter_with_its_default(name, capsys):
    from trl_plus.cli import main

    assert main(["show", name]) == 0
    table = capsys.readouterr().out.split("example recipe:")[0]
    for field_name, field in get_registry().methods[name].Config.model_fields.items():
        row = next((line for line in table.splitlines() if line.startswith(field_name + " ")), None)
        assert row is not None, f"trl-plus show {name} lacks {field_name}"
        assert repr(field.default) in row and field.description and field.description[:20] in row


@pytest.mark.parametrize("name", sorted(get_registry().methods))
def test_show_example_recipe_validates_with_its_data(name, tmp_path, monkeypatch):
    from trl_plus.cli import example_recipe
    from trl_plus.run.validate import load_split

    monkeypatch.chdir(ROOT)
    path = tmp_path / "example.yaml"
    path.write_text(example_recipe(get_registry().methods[name]))
    recipe = load_recipe(path)
    check_recipe(recipe)
    load_split(recipe, get_registry().get(name)(recipe.method_args), "train")  # the columns the method reads


def test_the_registry_knows_the_repository_plugins_for_its_install_hint():
    from trl_plus.registry import REPOSITORY_PLUGINS

    assert REPOSITORY_PLUGINS == {p.name for p in PLUGINS}


def test_the_readme_methods_table_is_the_registrys(monkeypatch):
    """The README's table is `trl-plus list --markdown` over the core and this repository's plugins: it cannot drift
    (regenerate it with that command when a method or its metadata changes)."""
    from trl_plus.registry import REPOSITORY_PLUGINS, load_registry
    from trl_plus.run.catalogue import methods_markdown

    monkeypatch.setenv("TRL_PLUS_PLUGINS", ",".join(sorted(REPOSITORY_PLUGINS)))
    table = methods_markdown(load_registry())
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| method | family | needs | paper | plugin |")
    assert readme[start : readme.index("\n\n", start)] == table, "README's methods table: run trl-plus list --markdown"
