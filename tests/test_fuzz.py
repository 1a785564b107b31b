"""Property-based: a valid recipe mutated at random (keys dropped, renamed or given values of another type, random
``--set`` overrides) is either accepted by validation or refused with a ``TrlPlusError`` (one line per problem),
never another exception. Runs the functions ``trl-plus validate`` runs (schema, method, training block, paths, the
data file; the token-length report aside), in a few seconds."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")  # the dev extra has it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from trl_plus import TrlPlusError  # noqa: E402
from trl_plus.config import load_recipe  # noqa: E402
from trl_plus.run.validate import check_recipe, load_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "<recipe>"
VALID = {
    "method": "dpo",
    "method_args": {"beta": 0.1, "loss_type": "sigmoid"},
    "model": {"name_or_path": "tiny-llama", "dtype": "float32", "lora": {"r": 4, "alpha": 8}},
    "reference": {"mode": "auto"},
    "data": {"train": {"path": str(ROOT / "recipes/data/quickstart_prefs.jsonl"), "limit": 8}},
    "training": {"max_steps": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 2, "logging_steps": 1,
                 "nan": "stop", "save_total_limit": 1},
}  # fmt: skip

values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=5),
    st.integers(), max_size=2), st.sampled_from(["auto", "dpo", "sft", "tiny-llama", "true", "-1", "1e-3", "."]),
)  # fmt: skip


def paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict."""
    out = []
    for key, value in tree.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += paths(value, (*prefix, key))
    return out


@st.composite
def mutated(draw) -> dict:
    recipe = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        keys = paths(recipe)
        if not keys:
            break
        path = draw(st.sampled_from(keys))
        parent = recipe
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["drop", "rename", "retype"]))
        if op == "drop":
            del parent[path[-1]]
        elif op == "rename":
            parent[path[-1] + draw(st.sampled_from(["s", "_", "x"]))] = parent.pop(path[-1])
        else:
            parent[path[-1]] = draw(values)
    return recipe


overrides = st.lists(
    st.builds(lambda key, value: f"{key}={value}",
              st.one_of(st.sampled_from([".".join(p) for p in paths(VALID)]), st.text(min_size=1, max_size=12)),
              st.one_of(st.sampled_from(["", "null", "[1, 2]", "{a: 1}", "-1", "0", "yes", "'x'", "{", "]"]),
                        st.text(max_size=8))),
    max_size=3,
)  # fmt: skip


def check(recipe: dict, sets: list[str], tmp: Path) -> None:
    if isinstance(recipe.get("training"), dict):  # never the repository's runs/ folder
        recipe["training"].setdefault("output_dir", str(tmp / "run"))
    try:
        parsed = load_recipe(recipe, sets)
        method, _ = check_recipe(parsed)
        load_split(parsed, method, "train")
    except TrlPlusError as exc:
        lines = str(exc).split("\n")  # what a terminal breaks at (splitlines also breaks at \x1e, \x85, ...)
        assert lines and all(line.strip() for line in lines), repr(str(exc))
        assert "Traceback" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=mutated(), sets=overrides)
def test_validation_accepts_or_explains_any_mutated_recipe(recipe, sets, tmp_path):
    check(recipe, sets, tmp_path)


def test_the_unmutated_recipe_is_valid(tmp_path):
    check_recipe(load_recipe({**VALID, "training": {**VALID["training"], "output_dir": str(tmp_path)}}))
