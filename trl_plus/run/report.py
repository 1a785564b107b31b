"""``trl-plus report RUN_DIR``: the training curves a user looks at first, as one PNG, from ``trainer_state.json``.

Four panels: loss, reward margin, reward accuracy, and the chosen/rejected sequence log-probs, each with the
training series (and the evaluation series when the run evaluated). ``trl-plus train`` writes the PNG at the end
of every run.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import TrlPlusError
from .rundir import RESOLVED_RECIPE, STATE_FILE

PNG_NAME = "training_curves.png"
PANELS = (
    ("loss", ["loss"], "loss"),
    ("reward margin", ["rewards/margins"], "margin"),
    ("reward accuracy", ["rewards/accuracies"], "accuracy"),
    ("sequence log-probs", ["logps/chosen", "logps/rejected"], "log-prob"),
)


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one logged metric (``eval_`` prefixed keys for the evaluation series)."""
    points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the training-curves PNG of a run directory (default ``RUN_DIR/training_curves.png``); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        raise TrlPlusError(f"{run_dir}: no trainer_state.json (is this the output_dir of a trl-plus train run?)")
    history = json.loads(state_file.read_text()).get("log_history", [])
    output = Path(output) if output else run_dir / PNG_NAME

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, keys, ylabel) in zip(axes.flat, PANELS):
        drawn = False
        for key in keys:
            label = key.split("/")[-1] if len(keys) > 1 else "train"
            for prefix, style in (("", "-"), ("eval_", "o--")):
                steps, values = series(history, prefix + key)
                if steps:
                    ax.plot(steps, values, style, label=f"{label} (eval)" if prefix else label, markersize=4)
                    drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by this method", ha="center", va="center", transform=ax.transAxes,
                    color="grey")  # fmt: skip
    fig.suptitle(_title(run_dir), fontsize=11)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _title(run_dir: Path) -> str:
    recipe = run_dir / RESOLVED_RECIPE
    if recipe.is_file():
        import yaml

        data = yaml.safe_load(recipe.read_text()) or {}
        model = (data.get("model") or {}).get("name_or_path", "?")
        return f"{data.get('method', '?')} on {model} — {run_dir}"
    return str(run_dir)
