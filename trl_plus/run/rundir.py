"""The run directory (``training.output_dir``): the files a run leaves and the commands after it read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The recipe as it ran, every method default written out (``trl-plus eval``/``merge`` read it).
RESOLVED_RECIPE = "trl_plus_recipe.yaml"
#: transformers' trainer state, with the log history.
STATE_FILE = "trainer_state.json"
#: The held-out before/after metrics (with ``data.eval``).
EVAL_REPORT = "eval_report.json"


def read_state(output_dir: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a run directory."""
    return json.loads((Path(output_dir) / STATE_FILE).read_text())


def last_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The most recent value of every training metric in a ``trainer_state.json`` log history."""
    out: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if not key.startswith("eval_") and isinstance(value, (int, float)):
                out[key] = value
    return out


def trained_model_path(run_dir: Path | None) -> Path | None:
    """The trained model in a run directory: a LoRA adapter or full weights (``None`` when there is none)."""
    if not run_dir or not run_dir.is_dir():
        return None
    for name in ("adapter_config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (run_dir / name).exists():
            return run_dir
    return None
