"""Every command a README shows works as written: each ``trl-plus`` line of every ```bash block in README.md and
the plugins' READMEs runs here, in order, in a scratch folder that sees the repository's ``recipes/`` (so runs land
there, not in the checkout).

- A ``trl-plus train`` line on the tiny model (the README's own ``--set`` lines make it tiny) trains, one step.
- A ``trl-plus train`` line of a GPU recipe (a 7B model) is validated, not trained: everything ``train`` checks
  before a model loads, with the quickstart pairs standing in for the user's data file when that is absent.
- A ``trl-plus new`` line scaffolds into a scratch folder of its own (``--root``).
- Setup lines (``pip``, ``make``, ``python -m venv``, ``.venv/bin/activate``), benchmarks, the test suite and
  ``accelerate launch`` (tested in tests/test_cli.py) are not run here; any other command fails the test until it
  is classified below.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trl_plus.cli import build_parser, main
from trl_plus.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("plugins/*/README.md"))]
NOT_RUN_HERE = ("pip", "make", "python3", ".", "source", "accelerate", "cd", "twine")
NOT_RUN_PREFIXES = ("python bench/", "python -m pytest", "python -m build", "pytest")
QUICK_DATA = "recipes/data/quickstart_prefs.jsonl"
ONE_STEP = ["training.max_steps=1", "training.gradient_accumulation_steps=1", "training.save_strategy='no'"]


def commands(readme: Path) -> list[str]:
    """The command lines of a README's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
    return lines


def trl_plus_args(command: str) -> list[str] | None:
    """The arguments of a ``trl-plus`` line; ``None`` for a line this test does not run (see the module doc)."""
    words = shlex.split(command)
    if words[0] == "trl-plus":
        return words[1:]
    if words[0] in NOT_RUN_HERE or command.startswith(NOT_RUN_PREFIXES):
        return None
    raise AssertionError(f"a README shows a command this test does not know how to check: {command}")


def is_tiny(args: list[str]) -> bool:
    parsed = build_parser().parse_args(args)
    return load_recipe(parsed.recipe, parsed.set).model.name_or_path in ("tiny-llama", "tiny-sd", "tiny-sd3", "tiny-flux", "tiny-wan")


def stand_in_data(args: list[str], readme: Path) -> list[str]:
    """``--set`` values for a GPU recipe whose data file is the user's: the ``data.*`` values of the README's own
    CPU line for the same recipe, else the quickstart pairs."""
    recipe = build_parser().parse_args(args).recipe
    for command in commands(readme):
        other = trl_plus_args(command)
        if other and other[0] == "train" and other[1] == recipe and is_tiny(other):
            return [value for value in build_parser().parse_args(other).set if value.startswith("data.")]
    return [f"data.train.path={QUICK_DATA}"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_readme_command_works_as_written(readme, workspace, capsys):
    ran = 0
    for command in commands(readme):
        args = trl_plus_args(command)
        if args is None:
            continue
        if args[0] == "new":  # the scaffold: into a folder of its own (the workspace's recipes/ is the checkout's)
            args = [*args, "--root", str(workspace / "new")]
            (workspace / "new").mkdir(exist_ok=True)
        elif args[0] == "train" and is_tiny(args):
            args = [*args, "--set", *ONE_STEP]
        elif args[0] == "train":  # a GPU recipe: everything train checks before a model loads, on stand-in data
            args = ["validate", *args[1:], "--set", *stand_in_data(args, readme)]
        code = main(args)
        assert code == 0, f"{readme.relative_to(ROOT)}: `{command}` exited {code}: {capsys.readouterr().err[-600:]}"
        ran += 1
    assert ran or readme.name == "README.md", f"{readme} shows no trl-plus command"
