"""A run says what matters: no FutureWarning that trl-plus's own configuration provokes, and one progress bar per
long phase (no datasets bars for a few hundred rows, no bar per checkpoint)."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import warnings

import pytest

import trl_plus

ROOT_DATA = "recipes/data/quickstart_prefs.jsonl"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two steps, each with an eval and a save, activation checkpointing on, on a file datasets has not cached yet:
    ``(warnings raised, what was drawn on stderr, output_dir)``."""
    tmp = tmp_path_factory.mktemp("quiet")
    data = shutil.copy(ROOT_DATA, tmp / "prefs.jsonl")
    overrides = [
        f"data.train.path={data}", "data.train.limit=16", "data.eval.limit=8", f"training.output_dir={tmp / 'out'}",
        "training.max_steps=2", "training.save_steps=1", "training.eval_steps=1", "training.logging_steps=1",
        "training.activation_checkpointing=true",
    ]  # fmt: skip
    stderr = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always")
        trl_plus.train("recipes/quickstart-tiny.yaml", overrides)
    return caught, stderr.getvalue(), tmp / "out"


def test_no_future_warning_from_our_configuration(tiny_run):
    caught, _, output_dir = tiny_run
    assert (output_dir / "checkpoint-1").is_dir() and (output_dir / "checkpoint-2").is_dir()
    future = sorted({f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)})
    assert not future, "\n".join(future)


def test_one_progress_bar_per_long_phase(tiny_run):
    _, stderr, _ = tiny_run
    bars = set(re.findall(r"([A-Za-z][^:\r\n%|]*): +\d+%\|", stderr))
    for noise in ("Generating train split", "Adding EOS to train dataset", "Tokenizing train dataset",
                  "Dropping fully truncated examples from eval dataset", "Writing model shards"):  # fmt: skip
        assert noise not in bars, bars
    assert "Scoring held-out pairs (recipes/data/quickstart_prefs_eval.jsonl)" in bars, bars
    assert re.search(r"100%\|[#█]+\| 2/2 \[", stderr), "the training bar"


def test_known_third_party_noise_is_dropped_and_nothing_else(caplog):
    """The command's quieting drops exactly the listed lines: transformers' torchvision fallback (printed when a
    diffusers pipeline module loads) goes, another warning of the same logger stays; calling it twice adds one
    filter."""
    import logging

    from trl_plus.errors import quiet_known_noise

    logger = logging.getLogger("transformers.utils.import_utils")
    before = list(logger.filters)
    logger.filters[:] = [f for f in before if not hasattr(f, "text")]  # (a command run earlier added it already)
    try:
        quiet_known_noise()
        quiet_known_noise()
        assert sum(hasattr(f, "text") for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=logger.name):
            logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `...Pil`")
            logger.warning("something else a user should see")
        assert [r.getMessage() for r in caplog.records] == ["something else a user should see"]
        assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.ERROR
    finally:
        logger.filters[:] = before
