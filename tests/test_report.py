"""The training-curves PNG says what a short run did: every logged point visible, eval series named "eval", and an
empty panel tells "not logged yet" from "not logged by this method"."""

from __future__ import annotations

import pytest

from trl_plus.run.report import curves_figure

TRAIN = {"loss": 0.6, "rewards/margins": 0.5, "rewards/accuracies": 0.75, "logps/chosen": -60.0, "logps/rejected": -80.0}
EVAL = {f"eval_{k}": v for k, v in TRAIN.items()}
SUMMARY = {"train_loss": 0.6, "train_runtime": 1.0}  # the entry every finished run ends with
NOT_YET = "no step logged yet (the run stopped at step 3, before logging_steps = 5)"


def panels(state):
    """``{panel title: axes}`` of the figure."""
    return {ax.get_title(): ax for ax in curves_figure(state).axes}


def texts(ax):
    return [t.get_text().replace("\n", " ") for t in ax.texts]


def legend(ax):
    return [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()]


def test_a_run_that_stopped_before_its_first_log_says_so():
    state = {"global_step": 3, "logging_steps": 5, "log_history": [{"step": 3, **SUMMARY}]}
    for title, ax in panels(state).items():
        assert texts(ax) == [NOT_YET], title
        assert not ax.lines


def test_an_eval_without_a_train_log_names_the_missing_train_series():
    state = {"global_step": 3, "logging_steps": 5, "log_history": [{"step": 3, **EVAL}, {"step": 3, **SUMMARY}]}
    assert legend(panels(state)["loss"]) == ["eval", f"train: {NOT_YET}"]


def test_a_single_point_is_drawn_with_a_marker_on_an_integer_step_axis():
    state = {"global_step": 5, "logging_steps": 5, "log_history": [{"step": 5, **TRAIN}, {"step": 5, **SUMMARY}]}
    for title, ax in panels(state).items():
        assert ax.lines and all(line.get_marker() == "o" and len(line.get_xdata()) == 1 for line in ax.lines), title
        assert not ax.texts
        assert all(float(tick).is_integer() for tick in ax.get_xticks()), (title, ax.get_xticks())


def test_eval_series_are_named_eval():
    history = [{"step": s, **TRAIN} for s in (5, 10)] + [{"step": 10, **EVAL}, {"step": 10, **SUMMARY}]
    axes = panels({"global_step": 10, "logging_steps": 5, "log_history": history})
    assert legend(axes["loss"]) == ["train", "eval"]
    assert legend(axes["sequence log-probs"]) == ["chosen (train)", "chosen (eval)", "rejected (train)",
                                                  "rejected (eval)"]  # fmt: skip
    assert axes["reward accuracy"].get_ylim() == pytest.approx((-0.05, 1.05))  # the whole scale


def test_a_metric_the_method_does_not_log_says_so():
    history = [{"step": s, "loss": 1.0 / s, "logps/chosen": -s} for s in (1, 2, 3)]  # sft: no rewards
    axes = panels({"global_step": 3, "logging_steps": 1, "log_history": history})
    assert texts(axes["reward margin"]) == ["not logged by this method"]
    assert legend(axes["sequence log-probs"]) == ["chosen (train)"]
