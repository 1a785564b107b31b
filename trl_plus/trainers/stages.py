"""Training stages: one ``trainer.train()`` per :class:`~trl_plus.Stage`, in order, each with a fresh optimiser and
scheduler, its checkpoints and final weights under ``output_dir/stage-<name>/``, the reference refreshed
(π_ref ← π_θ) before the stages that ask for it, and one log history over the whole run.

Resume (``resume=True``) skips the finished stages (their ``stage.json`` exists), loads the policy of the last
finished one, refreshes the reference as that run did, and resumes the first unfinished stage from its latest
checkpoint (or starts it). The loss curve equals an uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..contract import Stage
from ..data.load import quiet_progress
from ..errors import TrlPlusError
from .adapters import REFERENCE_ADAPTER

#: Written into a stage's folder when it has finished: its name and step count.
STAGE_DONE = "stage.json"


def stage_dir(output_dir: str | Path, stage: Stage) -> Path:
    """Where a stage's checkpoints and final weights go."""
    return Path(output_dir) / f"stage-{stage.name}"


def select_stages(stages: list[Stage], only: list[str] | None, refresh: bool | None, where: str) -> list[Stage]:
    """The stages a recipe runs: ``only`` (names, in the method's order) and ``refresh`` (overrides every stage's
    ``refresh_reference``; the first stage never refreshes: its reference is the starting policy)."""
    names = [stage.name for stage in stages]
    only = None if only is None else [str(name) for name in only]
    unknown = [name for name in only or () if name not in names]
    if unknown:
        raise TrlPlusError(f"{where}: no stage {unknown[0]!r}; the stages are {', '.join(names)}")
    chosen = [stage for stage in stages if only is None or stage.name in only]
    if refresh is not None:
        chosen = [Stage(s.name, s.rows, refresh and i > 0) for i, s in enumerate(chosen)]
    return chosen


def stages_by(column: str, dataset: Any, refresh: bool, where: str) -> list[Stage]:
    """One stage per value of ``column`` (sorted), named by the value: a recipe's ``stages.by``."""
    if column not in dataset.column_names:
        raise TrlPlusError(f"{where}: the data has no column {column!r}; it has {', '.join(dataset.column_names)}")
    values = sorted(set(dataset[column]))
    return [Stage(str(v), rows=lambda row, v=v: row[column] == v, refresh_reference=refresh and i > 0)
            for i, v in enumerate(values)]  # fmt: skip


def run_stages(trainer: Any, stages: list[Stage], resume: bool = False) -> None:
    """Train ``trainer`` stage by stage (see the module docstring); afterwards ``trainer.state.log_history`` holds
    every stage's entries, each with ``stage`` and a run-wide ``step``, and ``trainer.state.global_step`` the total.
    On Ctrl-C ``trainer.args.output_dir`` is left at the interrupted stage's folder, where a checkpoint belongs."""
    if any(stage.refresh_reference for stage in stages) and trainer.reference_mode == "none":
        raise TrlPlusError(f"stages: method {trainer.method.name!r} is reference-free; a stage cannot refresh its "
                           "reference (set stages.refresh_reference: false)")  # fmt: skip
    full, root = trainer.train_dataset, trainer.args.output_dir
    history: list[dict[str, Any]] = []
    steps, finished = 0, None
    try:
        for stage in stages:
            folder = stage_dir(root, stage)
            if resume and (folder / STAGE_DONE).is_file():
                history += _stage_history(json.loads((folder / "trainer_state.json").read_text()), stage, steps)
                steps += json.loads((folder / STAGE_DONE).read_text())["steps"]
                finished = folder
                continue
            if finished is not None:  # resuming after finished stages: their policy, before any refresh
                trainer._load_from_checkpoint(str(finished))
                finished = None
            with quiet_progress():
                trainer.train_dataset = full.filter(stage.rows) if stage.rows else full
            if len(trainer.train_dataset) == 0:
                raise TrlPlusError(f"stage {stage.name!r} has no training rows")
            if stage.refresh_reference:
                trainer.refresh_reference()
            trainer.args.output_dir = str(folder)
            _fresh_optimizer(trainer)
            checkpoint = _last_checkpoint(folder) if resume else None
            trainer.train(resume_from_checkpoint=checkpoint)
            trainer.save_model(str(folder))
            trainer.state.save_to_json(str(folder / "trainer_state.json"))
            (folder / STAGE_DONE).write_text(json.dumps({"name": stage.name, "steps": trainer.state.global_step}))
            history += _stage_history({"log_history": trainer.state.log_history}, stage, steps)
            steps += trainer.state.global_step
    except KeyboardInterrupt:  # the caller saves a checkpoint: into the interrupted stage's folder
        raise
    except BaseException:
        trainer.args.output_dir, trainer.train_dataset = root, full
        raise
    trainer.args.output_dir, trainer.train_dataset = root, full
    finish_run(trainer, finished, history, steps)


def finish_run(trainer: Any, finished: Path | None, history: list[dict[str, Any]], steps: int) -> None:
    """After the last stage or iteration: the final policy loaded (``finished``: the last part's folder, when every
    part had finished before a resume), the run-wide log history and step count set, the frozen ``ref`` adapter
    dropped (the saved model is the policy alone)."""
    if finished is not None:
        trainer._load_from_checkpoint(str(finished))
    trainer.state.log_history, trainer.state.global_step = history, steps
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(policy, "peft_config", None) and REFERENCE_ADAPTER in policy.peft_config:
        policy.delete_adapter(REFERENCE_ADAPTER)


def _stage_history(state: dict[str, Any], stage: Stage, offset: int) -> list[dict[str, Any]]:
    return [{**entry, "step": entry.get("step", 0) + offset, "stage": stage.name} for entry in state["log_history"]]


def _fresh_optimizer(trainer: Any) -> None:
    """A new optimiser and scheduler for the next ``train()`` (the accelerator forgets the old ones)."""
    trainer.optimizer, trainer.lr_scheduler = None, None
    accelerator = trainer.accelerator
    accelerator._optimizers, accelerator._schedulers, accelerator._dataloaders = [], [], []


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None
