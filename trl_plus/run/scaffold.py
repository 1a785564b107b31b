"""``trl-plus new NAME``: the files of a new method plugin, written from the templates in this module.

What it writes is what ``tests/test_meta.py`` asks of every plugin of the repository: ``plugins/NAME/`` with a
``pyproject.toml`` in the repository's pattern (distribution ``trl-plus-NAME``, one module ``trl_plus_NAME``, the
entry point ``NAME`` in group ``trl_plus``), the module (a config with one example hyperparameter, the method with
TODO paper fields, a ``loss`` that raises ``NotImplementedError``, the registration hook), a README skeleton, tests
on ``trl_plus.testing`` whose loss tests are strict xfails until the loss exists, and ``recipes/NAME.yaml`` on the
tiny offline model. Left to do by hand: the name in ``trl_plus.registry.REPOSITORY_PLUGINS`` and the README's
methods table regenerated (``trl-plus list --markdown``); :func:`next_steps` says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from string import Template

from ..errors import TrlPlusError
from ..registry import get_registry

#: Lowercase letters, digits and single dashes between them, starting with a letter.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
#: The names the generated module imports: a method class called like one of them would shadow it.
_IMPORTED = {"Field", "LossContext", "LossOutput", "Method", "MethodConfig", "Needs", "Paper", "hookimpl"}

PYPROJECT = Template('''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "trl-plus-${name}"
version = "0.1.0"
description = "${name} as a trl-plus method plugin"
readme = "README.md"
requires-python = ">=3.10"
license = "Apache-2.0"
dependencies = ["trl-plus"]

[project.entry-points.trl_plus]
${name} = "${module}"

[tool.setuptools]
py-modules = ["${module}"]
package-dir = {"" = "."}
''')

MODULE = Template('''\
"""${name} — TODO: the paper's title (TODO: authors, arXiv TODO: id).

TODO: the method in a few lines, as the paper's method section states it, and its objective:

    L = TODO

Read top to bottom: config, loss, registration (CONTRIBUTING.md, "The smallest complete plugin").
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import LossContext, LossOutput, Method, MethodConfig, Needs, Paper, hookimpl


class ${cls}Config(MethodConfig):
    """${name} hyperparameters; defaults: TODO (the paper's section or table, or the official config file)."""

    beta: float = Field(0.1, gt=0, description="β, TODO: what it scales (paper: TODO)")


class ${cls}(Method):
    """TODO: one line on what the method does."""

    name = "${name}"
    family = ${family}
    paper = Paper("TODO: title", "TODO: arXiv id")
    summary = "TODO: one line on what the method does"
    needs = Needs(reference="${reference}")
    Config = ${cls}Config

    def loss(self, ctx: LossContext) -> LossOutput:
        """TODO: the objective as a pure function of ``ctx``; rewards ``[K, B]`` for the logged margins."""
        # ctx.logps(), ctx.mean_logps(), ctx.lengths: [K, B], row 0 the chosen sequences, row 1 the rejected ones
        # ${reference_hint}
        # return LossOutput(loss=losses.mean(), rewards=(...).detach(), metrics={"${name}/...": ...})
        raise NotImplementedError(
            "trl-plus-${name}: implement loss() in ${module}.py (see CONTRIBUTING.md)"
        )


@hookimpl
def register_methods(register):
    """Register ``${name}``."""
    register(${cls})
''')

TESTS = Template('''\
"""${name}: the worked example, the gradient signs and a few real steps on the tiny model.

The loss tests are strict xfails until ``loss()`` is implemented; then remove their markers (README.md, Tests).
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ${module} import ${cls}

from trl_plus.testing import ${testing_imports}

# A worked example as [K][B][tokens] per-token log-probs: 2 pairs, row 0 chosen, row 1 rejected.
POLICY = [[[-1.0, -2.0], [-3.0]], [[-2.5, -2.5], [-2.0, -1.0]]]
REFERENCE = ${reference_values}


def test_config_defaults_and_typos():
    assert ${cls}().config.beta == 0.1
    with pytest.raises(ValidationError):
        ${cls}(bta=0.1)  # a mistyped key is an error, not silently ignored


@pytest.mark.xfail(raises=NotImplementedError, strict=True, reason="implement loss(), then remove this marker")
def test_worked_example():
    out = ${cls}().loss(make_context(POLICY, REFERENCE))
    expected = None  # TODO: the loss of POLICY/REFERENCE computed by hand (or the paper's own worked example)
    assert expected is not None, "write the worked example's loss, computed by hand, into test_worked_example"
    assert out.loss.item() == pytest.approx(expected, abs=1e-9)
    assert out.rewards.shape == (2, 2)


@pytest.mark.xfail(raises=NotImplementedError, strict=True, reason="implement loss(), then remove this marker")
def test_gradient_signs():
    ctx = make_context(POLICY, REFERENCE)
    ${cls}().loss(ctx).loss.backward()
    grad = ctx.token_logps.grad
    assert (grad[0][ctx.mask[0] > 0] < 0).all()  # the loss falls as the chosen log-probs rise
    assert (grad[1][ctx.mask[1] > 0] > 0).all()  # and as the rejected ones fall
    assert (grad[ctx.mask == 0] == 0).all()  # padding gets no gradient


@pytest.mark.xfail(raises=NotImplementedError, strict=True, reason="implement loss(), then remove this marker")
def test_a_few_steps_raise_the_margin(${steps_args}):
${steps_setup}    logs = training_logs(train_tiny(${cls}, tmp_path, max_steps=8))
    assert len(logs) == 8
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
''')

README = Template('''\
# trl-plus-${name} — TODO: the method's name

**Paper**: *TODO: title*, TODO: authors, arXiv [TODO: arXiv id](https://arxiv.org/abs/TODO), TODO: venue.
**Official code**: TODO: owner/name and the files the loss follows, or "none released".

## Objective

TODO: the loss in the paper's notation, one line per term, and how `loss()` computes it from the per-token
log-probs (`ctx.logps()` sums over the completion tokens, `ctx.mean_logps()` averages them):

    L = TODO,   mean over pairs

${reference_sentence} Logged rewards (`rewards/*`): TODO (what `LossOutput.rewards` holds).

## Hyperparameters

| name | default | source | meaning |
|---|---|---|---|
| `beta` | 0.1 | TODO: where the default comes from (paper section or table, official config file) | TODO |

## Deviations

TODO: where this implementation differs from the paper or the official code (reductions, truncation, defaults
chosen where the paper gives none), or "None".

## Data

Columns `prompt`, `chosen`, `rejected` (strings or chat messages, TRL's formats). TODO: any further column the
method reads (`needs.fields`) and what it holds.

## Use

```bash
pip install --no-deps -e plugins/${name}       # from the repository root, trl-plus installed
trl-plus show ${name}
trl-plus train recipes/${name}.yaml            # the tiny offline model on a CPU: seconds
```

## Tests

`tests/test_${module_suffix}.py` (`python -m pytest plugins/${name} -q`): the config's defaults and a mistyped key;
TODO: the worked example computed by hand, the gradient signs, and 8 real optimiser steps on the tiny model raising
the reward margin.

The loss tests are marked
`@pytest.mark.xfail(raises=NotImplementedError, strict=True, reason="implement loss(), then remove this marker")`,
so they fail visibly-as-expected (`xfailed`) until `loss()` is implemented; then they must have the marker removed:
strict xfail turns an implemented loss into a failure that says to remove the marker
(`[XPASS(strict)] implement loss(), then remove this marker`).
''')

RECIPE = Template('''\
# ${name} on the built-in tiny offline Llama and the quickstart pairs: a CPU check in seconds
# (trl-plus train recipes/${name}.yaml). Written by `trl-plus new`; TODO: the paper's hyperparameters in method_args,
# and a recipe for a real model next to this one (e.g. recipes/simpo.yaml: 7B with QLoRA on one GPU).
method: ${name}
method_args: {beta: 0.1}
model:
  name_or_path: tiny-llama          # built-in alias: random 2-layer Llama + char tokenizer, no network needed
  dtype: float32
reference: {mode: ${reference_mode}}
data:
  train: {path: data/quickstart_prefs.jsonl}
  eval: {path: data/quickstart_prefs_eval.jsonl}
training:
  output_dir: runs/${name}
  max_steps: 40
  learning_rate: 2.0e-3
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 16
  gradient_checkpointing: false
  logging_steps: 5
  save_steps: 20
  save_total_limit: 1
  seed: 0
''')


def class_name(name: str) -> str:
    """The method's class name: ``cpo-lite`` -> ``CpoLite``."""
    return "".join(part.capitalize() for part in name.split("-"))


def check_name(name: str) -> None:
    """A one-line error unless ``name`` is a well-formed method name that no installed plugin has."""
    if not NAME_PATTERN.fullmatch(name):
        raise TrlPlusError(f"method name {name!r}: use lowercase letters, digits and dashes, starting with a letter "
                           "(e.g. cpo-lite)")  # fmt: skip
    clash = {class_name(name), class_name(name) + "Config"} & _IMPORTED
    if clash:
        raise TrlPlusError(f"method name {name!r}: its class {min(clash)} would shadow trl_plus's name; "
                           "choose another")  # fmt: skip
    registry = get_registry()
    if name in registry.methods:
        raise TrlPlusError(f"method name {name!r} is taken: {registry.sources[name]} registers it; choose another")
    if name in registry.broken:
        raise TrlPlusError(f"method name {name!r} is taken: {registry.broken[name].source} (a broken plugin); "
                           "choose another")  # fmt: skip


def files(name: str, family: str = "offline-pairwise", reference_free: bool = False) -> dict[str, str]:
    """The scaffold of method ``name``: repository-relative path -> text."""
    module = "trl_plus_" + name.replace("-", "_")
    ref = "no" if reference_free else "yes"
    values = {
        "name": name, "module": module, "module_suffix": module.removeprefix("trl_plus_"), "cls": class_name(name),
        "family": json.dumps(family, ensure_ascii=False), "reference": ref,
        "reference_mode": "none" if reference_free else "auto",
        "reference_hint": "reference-free: ctx.ref_token_logps is None (no reference is ever computed)"
        if reference_free else "ctx.ref_logps(): [K, B] reference sequence log-probs (no grad)",
        "reference_values": "None  # reference-free" if reference_free
        else "[[[-1.5, -2.0], [-3.0]], [[-2.0, -2.5], [-1.5, -1.0]]]  # same shape as POLICY",
        "reference_sentence": "Reference-free: trl-plus loads no reference weights and runs no reference forward pass."
        if reference_free else "Needs a frozen reference model (`reference.mode: auto`).",
        "testing_imports": "forbid_reference, make_context, train_tiny, training_logs" if reference_free
        else "make_context, train_tiny, training_logs",
        "steps_args": "tmp_path, monkeypatch" if reference_free else "tmp_path",
        "steps_setup": "    forbid_reference(monkeypatch)  # reference-free: any reference forward fails the test\n"
        if reference_free else "",
    }  # fmt: skip
    plugin = f"plugins/{name}"
    return {
        f"{plugin}/pyproject.toml": PYPROJECT.substitute(values),
        f"{plugin}/{module}.py": MODULE.substitute(values),
        f"{plugin}/README.md": README.substitute(values),
        f"{plugin}/tests/test_{values['module_suffix']}.py": TESTS.substitute(values),
        f"recipes/{name}.yaml": RECIPE.substitute(values),
    }


def scaffold(name: str, root: str | Path = ".", family: str = "offline-pairwise",
             reference_free: bool = False) -> list[Path]:  # fmt: skip
    """Write the plugin ``plugins/NAME/`` and ``recipes/NAME.yaml`` under ``root``; return the paths written.

    Nothing is written unless all is well: a bad or taken name, a missing ``root``, an existing plugin folder or
    recipe is a one-line :class:`TrlPlusError` naming it.
    """
    check_name(name)
    root = Path(root)
    if not root.is_dir():
        raise TrlPlusError(f"--root {root}: no such directory")
    for existing in (root / "plugins" / name, root / "recipes" / f"{name}.yaml"):
        if existing.exists():
            raise TrlPlusError(f"{existing} already exists; not overwriting it (choose another name or remove it)")
    written = []
    for relative, text in files(name, family, reference_free).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def next_steps(name: str, root: str | Path = ".", family: str = "offline-pairwise",
               reference_free: bool = False) -> str:  # fmt: skip
    """What to do after :func:`scaffold`, as printed by ``trl-plus new``."""
    plugin = Path(root) / "plugins" / name
    return "\n".join([
        "next steps:",
        f"  implement loss() in {plugin}/trl_plus_{name.replace('-', '_')}.py; fill in its TODOs and the README's",
        f"  pip install -e {plugin}",
        f"  trl-plus show {name}",
        f"  python -m pytest {plugin}      # the loss tests xfail until loss() exists; then remove their markers",
        f"  by hand: add {name!r} to REPOSITORY_PLUGINS in trl_plus/registry.py, then regenerate the README's methods",
        f"  table with `trl-plus list --markdown` (tests/test_meta.py checks both)",
    ])  # fmt: skip
