"""What keeps a long run safe, as a mixin of the trainers: atomic checkpoints and a guard against NaN / inf.

- **Atomic checkpoints.** transformers writes ``checkpoint-N`` file by file; a run killed in the middle leaves a
  folder that ``get_last_checkpoint`` (``training.resume_from_checkpoint: true``) would pick. Here each checkpoint is
  written into ``.tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete: a name transformers never matches
  (``^checkpoint-\\d+$``), so a half-written checkpoint is never resumed from.
- **Non-finite loss or gradient norm** (``training.nan``): ``stop`` (the default) ends the run at that step, before the
  optimizer touches the weights, with one line naming the step, the metric and the last good checkpoint; ``skip``
  drops the step's batch (no optimizer update: the gradients are discarded) and counts it (``nan_skipped``, logged).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import TrlPlusError

#: ``training.nan`` values.
NAN_POLICIES = ("stop", "skip")
#: The prefix of a checkpoint being written (``.tmp-checkpoint-N``), renamed to ``checkpoint-N`` once complete.
STAGING_PREFIX = ".tmp-"
#: The logged count of dropped non-finite steps.
SKIPPED_METRIC = "nan_skipped"
#: Counters the trainer keeps that transformers' ``TrainerState`` does not (TRL's ``num_tokens`` total, the dropped
#: steps): saved in each checkpoint's ``trainer_state.json`` and restored on resume, so that a resumed run logs what
#: an uninterrupted one does.
RESUMED_COUNTERS = ("_total_train_tokens", "nan_skipped")
STATE_KEY = "trl_plus"


def _finite(value) -> bool:
    """Whether a loss or a gradient norm (a tensor, a float or ``None``: not computed) is finite."""
    import torch

    return value is None or bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float32)).all())


def _value(value) -> float:
    import torch

    return float(torch.as_tensor(value, dtype=torch.float32).mean())


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The latest complete ``checkpoint-N`` in ``output_dir`` (as transformers picks it), or ``None``."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


class GuardMixin:
    """Atomic checkpoints and the NaN guard for a ``transformers.Trainer`` subclass (put it first in the bases).

    ``nan`` (``"stop"`` or ``"skip"``, see the module doc) is taken from the constructor's keyword arguments.
    """

    def __init__(self, *args, nan: str = "stop", **kwargs):
        if nan not in NAN_POLICIES:
            raise TrlPlusError(f"training.nan: expected one of {', '.join(NAN_POLICIES)}, got {nan!r}")
        self.nan = nan
        self.nan_skipped = 0  # steps dropped in this process (a resumed run adds the count it had logged)
        self._bad_loss: float | None = None  # a non-finite loss seen since the last optimizer step
        self._checkpoint_staging: str | None = None
        super().__init__(*args, **kwargs)

    # -- NaN / inf -------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """The parent's step (forward, backward); a non-finite loss is remembered for the optimizer step."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not _finite(loss) and self._bad_loss is None:
            self._bad_loss = _value(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """transformers' gradient norm, computed once per optimizer step just before ``optimizer.step()``: the place
        where a non-finite loss or norm stops the run, or has the step's gradients dropped."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        bad_loss, self._bad_loss = self._bad_loss, None
        if bad_loss is None and _finite(grad_norm):
            return grad_norm
        step = self.state.global_step + 1
        metric, value = ("loss", bad_loss) if bad_loss is not None else ("grad_norm", _value(grad_norm))
        if self.nan == "stop":
            checkpoint = last_checkpoint(self.args.output_dir)
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
            raise TrlPlusError(
                f"training.nan: {metric} is {value} at step {step}: training stopped before the optimizer step; {kept}"
                " (lower training.learning_rate, or set training.nan: skip to drop such batches)"
            )
        self.nan_skipped += 1
        model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every parameter and its state as is
        return grad_norm

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The parent's log, with the count of dropped steps once there is one."""
        if self.nan_skipped and "loss" in logs:
            logs[SKIPPED_METRIC] = self.nan_skipped
        super().log(logs, *args, **kwargs)

    # -- atomic checkpoints, exact resume ---------------------------------------------------------------------
    def _run_epoch(self, *args, **kwargs):
        """The parent's epoch, unless every step is done: transformers, resumed from the checkpoint of the last step
        (a run killed after its last save), trains one step more than ``max_steps`` before it checks."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _init_training_state(self, *args, **kwargs):
        """The parent's (the state loaded from the checkpoint when resuming), then the counters it lacks."""
        result = super()._init_training_state(*args, **kwargs)
        saved = (self.state.stateful_callbacks or {}).get(STATE_KEY, {})
        for name in RESUMED_COUNTERS:
            if name in saved:
                setattr(self, name, saved[name])
        return result

    def _get_output_dir(self, trial):
        if self._checkpoint_staging is not None:
            return self._checkpoint_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The parent's checkpoint, written into ``.tmp-checkpoint-N/`` and then renamed to ``checkpoint-N``."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = run_dir / f"{STAGING_PREFIX}{name}", run_dir / name
        if self.args.should_save:
            for stale in run_dir.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.state.stateful_callbacks[STATE_KEY] = {n: getattr(self, n) for n in RESUMED_COUNTERS if hasattr(self, n)}
        self._checkpoint_staging = str(staging)  # the parent writes staging/checkpoint-N (see _get_output_dir)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are in before the rename
        if not self.args.should_save:
            return
        if final.exists():  # saved again at the same step (Ctrl-C right after a save): the new one replaces it
            aside = run_dir / f"{STAGING_PREFIX}old-{name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(staging / name, final)
            shutil.rmtree(aside)
        else:
            os.replace(staging / name, final)
        shutil.rmtree(staging)
        best = self.state.best_model_checkpoint
        if best is not None and Path(best) == staging / name:
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(final / "trainer_state.json"))
        rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
