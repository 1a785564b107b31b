"""Real wheels: the core and two plugins built as wheels, installed (not editable) into a fresh venv, used there.

The editable installs the rest of the suite runs against never show what a user gets from ``pip install``:
which files a wheel holds, that entry points are found from installed metadata, that ``trl-plus`` is a console
script. This module builds ``trl-plus``, ``trl-plus-simpo`` and ``trl-plus-ln-dpo`` with
``pip wheel --no-deps --no-build-isolation --no-index`` (setuptools is in every environment that has torch:
torch requires it), installs them with ``pip install --no-deps --no-index`` into a new virtual environment and
runs ``trl-plus list``, a two-step training and ``pip uninstall`` with that environment's own ``bin/trl-plus``,
from a scratch folder, without ``PYTHONPATH``. Nothing is downloaded.

The overlay. A fresh venv has none of the dependencies (torch, transformers, trl, ...), and installing them
would mean a download of gigabytes. The environment running these tests has them all, but also trl-plus and
every plugin as editable installs; ``include-system-site-packages`` or a ``.pth`` line naming its
site-packages would bring those along, and the registry would then see each method twice. So the test builds
an *overlay*: a folder of symlinks to every entry of this environment's site-packages except trl-plus's own
(``trl_plus*`` modules, packages and metadata, ``__editable__*`` finders) and the ``.pth`` files (which add the
checkouts to ``sys.path``). One ``.pth`` line in the new venv's site-packages names the overlay, so the new
venv imports the same torch, and sees exactly the three distributions installed from the wheels. The venv is
made ``--without-pip``: its ``python -m pip`` is this environment's pip, through the overlay, and installs into
the new venv (pip installs into the running interpreter's prefix).

The sources are copied to a temporary folder before building: ``pip wheel`` builds in the source tree, where
setuptools writes ``build/`` and ``*.egg-info`` (and a stale ``build/lib`` could leak deleted modules into a
wheel); the checkout stays untouched.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("simpo", "ln-dpo")
DISTRIBUTIONS = {"trl-plus", "trl-plus-simpo", "trl-plus-ln-dpo"}
#: What the build reads, and what must stay out of the core's wheel (tests/, plugins/, bench/).
SOURCES = ("pyproject.toml", "README.md", "trl_plus", "tests", "plugins", "bench")
JUNK = shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "dist", ".pytest_cache")


def _not_trl_plus(name: str) -> bool:
    """An entry of this environment's site-packages that the overlay may link (all but trl-plus's own)."""
    return not (name.startswith(("trl_plus", "__editable__")) or name.endswith(".pth"))


def _overlay(folder: Path) -> Path:
    folder.mkdir()
    paths = sysconfig.get_paths()
    for site in dict.fromkeys([paths["purelib"], paths["platlib"]]):  # one folder in a venv; two on some systems
        for entry in Path(site).iterdir():
            if _not_trl_plus(entry.name) and not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def _run(args, cwd, env, check=True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheels")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRL_PLUS_PLUGINS", "PYTHONHOME")}
    env |= {"HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}

    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree(ROOT / name, src / name, ignore=JUNK) if (ROOT / name).is_dir()
         else shutil.copy2(ROOT / name, src / name))  # fmt: skip
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", dist, src, *(src / "plugins" / p for p in PLUGINS)], cwd=tmp, env=env)  # fmt: skip
    wheels = {w.name.split("-")[0]: w for w in dist.glob("*.whl")}

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp, env=env)
    (Path(site.stdout.strip()) / "_outer_dependencies.pth").write_text(f"{_overlay(tmp / 'overlay')}\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheels.values()], cwd=tmp, env=env)

    scratch = tmp / "scratch"
    scratch.mkdir()
    return SimpleNamespace(wheels=wheels, python=python, bin=venv / "bin", scratch=scratch, env=env)


def listed(stdout: str) -> dict[str, str]:
    """``trl-plus list``'s methods and the last word of their source column (a distribution, or ``(built-in)``)."""
    table = stdout.split("\n\n", 1)[0].splitlines()[3:]  # after the two header lines and the rule
    return {line.split()[0]: line.split()[-1] for line in table if line[:1].isalpha()}


def trl_plus(wheel_env, *args, check=True):
    """The new venv's ``trl-plus`` console script, from the scratch folder."""
    return _run([wheel_env.bin / "trl-plus", *args], cwd=wheel_env.scratch, env=wheel_env.env, check=check)


def test_each_wheel_holds_its_own_files_only(wheel_env):
    assert set(wheel_env.wheels) == {"trl_plus", "trl_plus_simpo", "trl_plus_ln_dpo"}
    core = zipfile.ZipFile(wheel_env.wheels["trl_plus"]).namelist()
    for path in ("trl_plus/__init__.py", "trl_plus/contract.py", "trl_plus/cli.py", "trl_plus/run/train.py",
                 "trl_plus/trainers/preference.py", "trl_plus/builtin/dpo.py", "trl_plus/data/load.py",
                 "trl_plus/models/tiny.py", "trl_plus/methods/dpo.py"):  # fmt: skip
        assert path in core, path
    packages = {p.split("/")[0] for p in core}
    assert packages == {"trl_plus", "trl_plus-0.2.0.dist-info"}, packages  # no tests/, plugins/, bench/
    # every module of the checkout's trl_plus/ is in the wheel
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "trl_plus").rglob("*.py")}
    assert modules <= set(core), modules - set(core)
    entry_points = zipfile.ZipFile(wheel_env.wheels["trl_plus"]).read("trl_plus-0.2.0.dist-info/entry_points.txt")
    assert b"trl-plus = trl_plus.cli:main" in entry_points
    for plugin in PLUGINS:
        module = f"trl_plus_{plugin.replace('-', '_')}"
        files = zipfile.ZipFile(wheel_env.wheels[module]).namelist()
        assert {f for f in files if ".dist-info/" not in f} == {f"{module}.py"}, files
        entry_points = next(f for f in files if f.endswith(".dist-info/entry_points.txt"))
        assert f"{plugin} = {module}" in zipfile.ZipFile(wheel_env.wheels[module]).read(entry_points).decode()


def test_the_venv_sees_the_wheels_and_the_outer_dependencies(wheel_env):
    code = (
        "import importlib.metadata as md, json, torch, trl_plus, trl_plus_simpo;"
        "print(json.dumps({'dists': sorted(d.metadata['Name'] for d in md.distributions()"
        " if d.metadata['Name'].startswith('trl-plus')), 'trl_plus': trl_plus.__file__,"
        " 'simpo': trl_plus_simpo.__file__, 'torch': torch.__version__}))"
    )
    seen = json.loads(_run([wheel_env.python, "-c", code], cwd=wheel_env.scratch, env=wheel_env.env).stdout)
    assert sorted(seen["dists"]) == sorted(DISTRIBUTIONS)  # once each: none of the outer editable installs
    venv = wheel_env.bin.parent
    assert Path(seen["trl_plus"]).is_relative_to(venv) and Path(seen["simpo"]).is_relative_to(venv), seen
    assert seen["torch"] == importlib.metadata.version("torch")  # the outer torch, through the overlay


#: The core's own methods, as `trl-plus list` shows them.
BUILT_INS = {name: "(built-in)" for name in ("dpo", "sft", "grpo", "diffusion-dpo", "diffusion-sft")}


def test_installed_command_lists_trains_and_forgets_an_uninstalled_plugin(wheel_env):
    before = trl_plus(wheel_env, "list").stdout
    assert listed(before) == {**BUILT_INS, "simpo": "trl-plus-simpo", "ln-dpo": "trl-plus-ln-dpo"}, before

    out = wheel_env.scratch / "run"
    # the recipe's data/ path is read from the recipe's folder, not from the scratch working directory
    trained = trl_plus(wheel_env, "train", ROOT / "recipes" / "quickstart-tiny.yaml", "--set", "method=simpo",
                       "method_args.beta=2.0", "data.eval=null", "training.max_steps=2", "training.logging_steps=1",
                       "training.save_strategy='no'", "training.disable_tqdm=true", f"training.output_dir={out}")  # fmt: skip
    assert "finished after 2 steps" in trained.stdout, trained.stdout
    assert yaml.safe_load((out / "trl_plus_recipe.yaml").read_text())["method"] == "simpo"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "model.safetensors").exists()

    _run([wheel_env.python, "-m", "pip", "uninstall", "-q", "-y", "trl-plus-simpo"], cwd=wheel_env.scratch,
         env=wheel_env.env)  # fmt: skip
    after = trl_plus(wheel_env, "list").stdout
    assert listed(after) == {**BUILT_INS, "ln-dpo": "trl-plus-ln-dpo"}, after
    assert "broken" not in after
    gone = trl_plus(wheel_env, "validate", ROOT / "recipes" / "simpo.yaml", check=False)
    assert gone.returncode == 2 and "unknown method 'simpo'" in gone.stderr, gone.stderr
