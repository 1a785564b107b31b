"""``trl-plus report RUN_DIR``: the training curves a user looks at first, as one PNG, from ``trainer_state.json``.

Four panels: loss, reward margin, reward accuracy, and the chosen/rejected sequence log-probs, each with the
training series and the evaluation series ("eval") when the run evaluated; short series are drawn point by point
(a 5-step run's one logged step is visible), and a panel without a training series says why: no logging step
reached yet, or a metric the method does not log. ``trl-plus train`` writes the PNG at the end of every run.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from ..errors import TrlPlusError
from .rundir import RESOLVED_RECIPE, STATE_FILE

PNG_NAME = "training_curves.png"
#: (title, logged keys, y label, y limits or None)
PANELS = (
    ("loss", ["loss"], "loss", None),
    ("reward margin", ["rewards/margins"], "margin", None),
    ("reward accuracy", ["rewards/accuracies"], "accuracy", (-0.05, 1.05)),  # the whole scale: 0.8 -> 1 is no cliff
    ("sequence log-probs", ["logps/chosen", "logps/rejected"], "log-prob", None),
)
MARKERS_UP_TO = 50  # a series of at most this many points gets a marker per point (a lone point is visible)


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one logged metric (``eval_`` prefixed keys for the evaluation series)."""
    points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


def curves_figure(state: dict, title: str = ""):
    """The figure :func:`plot_run` writes, from a ``trainer_state.json`` dict: four panels of train and eval
    series; a panel with nothing to draw says why (no logging step reached yet, or a metric the method does not
    log)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    history = state.get("log_history", [])
    fig = Figure(figsize=(11, 7), layout="constrained")
    for ax, (panel, keys, ylabel, ylim) in zip(fig.subplots(2, 2).flat, PANELS):
        for key in keys:
            for prefix, split, style in (("", "train", "-"), ("eval_", "eval", "--")):
                steps, values = series(history, prefix + key)
                if steps:
                    label = split if len(keys) == 1 else f"{key.split('/')[-1]} ({split})"
                    ax.plot(steps, values, style, marker="o" if len(steps) <= MARKERS_UP_TO else None,
                            markersize=4, label=label, gid=split)  # fmt: skip
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps, even for a single one
        ax.grid(alpha=0.3)
        has_train = any(line.get_gid() == "train" for line in ax.lines)
        note = None if has_train else textwrap.fill(_no_train_series(state), 36)
        if ax.lines:
            handles, labels = ax.get_legend_handles_labels()
            if note:  # why the train series is missing, as a legend line under the eval series
                handles.append(Line2D([], [], linestyle="none"))
                labels.append(f"train: {note}")
            ax.legend(handles, labels, fontsize=8)
            if ylim:
                ax.set_ylim(*ylim)
        else:
            ax.set_xticks([]), ax.set_yticks([])
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(title, fontsize=11)
    return fig


def _no_train_series(state: dict) -> str:
    if any("loss" in e for e in state.get("log_history", [])):  # the run logged steps, only not this metric
        return "not logged by this method"
    step, every = state.get("global_step", 0), state.get("logging_steps")
    if every and step < every:
        return f"no step logged yet (the run stopped at step {step}, before logging_steps = {every})"
    return f"no step logged in {step} steps"


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the training-curves PNG of a run directory (default ``RUN_DIR/training_curves.png``); return its path."""
    run_dir = Path(run_dir)
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        raise TrlPlusError(f"{run_dir}: no trainer_state.json (is this the output_dir of a trl-plus train run?)")
    output = Path(output) if output else run_dir / PNG_NAME
    curves_figure(json.loads(state_file.read_text()), _title(run_dir)).savefig(output, dpi=110)
    return output


def _title(run_dir: Path) -> str:
    recipe = run_dir / RESOLVED_RECIPE
    if recipe.is_file():
        import yaml

        data = yaml.safe_load(recipe.read_text()) or {}
        model = (data.get("model") or {}).get("name_or_path", "?")
        return f"{data.get('method', '?')} on {model} — {run_dir}"
    return str(run_dir)
