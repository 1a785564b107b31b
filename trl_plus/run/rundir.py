"""The run directory (``training.output_dir``): the files a run leaves and the commands after it read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import TrlPlusError

#: The recipe as it ran, every method default written out (``trl-plus eval``/``merge`` read it).
RESOLVED_RECIPE = "trl_plus_recipe.yaml"
#: transformers' trainer state, with the log history.
STATE_FILE = "trainer_state.json"
#: The recipe's ``metrics:`` on the final model (summaries and artefact paths), and the folder of their artefacts.
METRICS_REPORT = "metrics_report.json"
METRICS_DIR = "metrics"
#: The held-out before/after metrics (with ``data.eval``).
EVAL_REPORT = "eval_report.json"
#: The model card in the Hub's format: method, paper, recipe, held-out figures.
MODEL_CARD = "README.md"


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


def run_identity(method: str, model: Any) -> str:
    """Whose a run is, in words: ``"dpo on tiny-llama"`` (the model's GGUF file named when it has one)."""
    name = model.get("name_or_path") if isinstance(model, dict) else model.name_or_path
    gguf = model.get("gguf_file") if isinstance(model, dict) else model.gguf_file
    return f"{method} on {name}" + (f" ({gguf})" if gguf else "")


def check_run_owner(run_dir: str | Path, method: str, model: Any, key: str = "training.output_dir") -> None:
    """Refuse a run directory that holds another method's or another model's run (its ``trl_plus_recipe.yaml``
    says whose it is): training, resuming or evaluating there would mix two runs' checkpoints and files."""
    recorded = Path(run_dir) / RESOLVED_RECIPE
    if not recorded.is_file():
        return
    import yaml

    try:
        data = yaml.safe_load(recorded.read_text()) or {}
        theirs = run_identity(data["method"], data["model"])
    except Exception:  # not ours to judge: an unreadable file is reported by whoever reads it next
        return
    ours = run_identity(method, model)
    if theirs != ours:
        raise TrlPlusError(
            f"{key}: {run_dir} holds a run of {theirs} (see {recorded}), not of this recipe's {ours}; "
            f"resume that run with its own recipe (`trl-plus train {recorded} --set "
            "training.resume_from_checkpoint=true`), replace it with training.overwrite_output_dir: true, or choose "
            "another training.output_dir"
        )


def clear_run_dir(run_dir: str | Path, protect: list[str | Path] = ()) -> None:
    """Empty ``run_dir`` for ``training.overwrite_output_dir: true``: only a folder that holds a trl-plus run (its
    ``trl_plus_recipe.yaml``) or nothing, and never one that holds (or is) the working directory or a path in
    ``protect`` (the recipe, its data files); otherwise a one-line error and nothing is deleted."""
    import shutil

    folder = Path(run_dir).expanduser().resolve()
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    key = "training.overwrite_output_dir"
    if not (folder / RESOLVED_RECIPE).is_file():
        raise TrlPlusError(f"{key}: {folder} holds files but no trl-plus run ({RESOLVED_RECIPE}); trl-plus replaces "
                           "only its own runs: empty that folder yourself or choose another training.output_dir")
    for path in [Path.cwd(), *protect]:
        path = Path(path).expanduser().resolve()
        if path == folder or folder in path.parents:
            raise TrlPlusError(f"{key}: {folder} holds {path}, which overwriting would delete; choose another "
                               "training.output_dir")
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
