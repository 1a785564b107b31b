"""Rounds of phases (a recipe's ``phases:`` block): several methods take turns on one policy, each phase stopped
by a rule on what it logs, the rounds by a rule on what the round logged (EAR, "Learning Preferences without
Interaction for Cooperative AI": one behaviour-cloning epoch on liked trajectories, then RL until the team return
is back, until the preference score is reached).

Each phase is a recipe of its own — the run's, with the phase's method, ``method_args``, data, ``rollout`` and
``training`` — built by :func:`~trl_plus.run.train.build_trainer` around the policy the previous phase left (the
same model object: no reload, no copy), trained under ``output_dir/round-<r>-<name>/`` (its checkpoints and
``trainer_state.json``). A phase may be a pairwise method on PlusTrainer, ``sft``, or a group method on
PlusGRPOTrainer. The run's ``trainer_state.json`` holds every phase's log entries, each with ``round``, ``phase``
and a run-wide ``step``; the final policy is saved in ``output_dir``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..config import PhaseSpec, Recipe, StopRule
from .validate import phase_recipe


def phase_dir(output_dir: str | Path, round_index: int, phase: PhaseSpec) -> Path:
    """Where phase ``phase`` of round ``round_index`` (0-based) trains: ``round-<r+1>-<name>``."""
    return Path(output_dir) / f"round-{round_index + 1}-{phase.name}"


class StopWhen(TrainerCallback):
    """Ends training at the first logged step whose ``rule.key`` satisfies ``rule``; remembers that step."""

    def __init__(self, rule: StopRule):
        self.rule, self.stopped_at, self.values = rule, None, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = (logs or {}).get(self.rule.key)
        if value is None or self.stopped_at is not None:
            return
        self.values.append(float(value))
        if self.rule.reached(self.values):
            self.stopped_at = state.global_step
            control.should_training_stop = True


def run_phases(recipe: Recipe, build_trainer: Callable[..., Any]) -> dict[str, Any]:
    """Train ``recipe``'s rounds of phases (see the module docstring); return the run's summary: ``trainer`` (the
    last phase's), ``log`` (every entry, tagged), ``rounds`` (how many ran), ``stopped`` (the outer rule was met)
    and ``steps`` (optimiser steps of all phases). ``build_trainer(recipe, callbacks=, model=)`` builds a phase's
    trainer (:func:`trl_plus.run.train.build_trainer`)."""
    plan = recipe.phases
    root = Path(recipe.training.get("output_dir") or f"runs/{recipe.method}")
    model, trainer, log, steps, stopped = None, None, [], 0, False
    for r in range(plan.rounds):
        round_log = []
        for phase in plan.sequence:
            folder = phase_dir(root, r, phase)
            stop = [StopWhen(phase.until)] if phase.until else []
            trainer = build_trainer(phase_recipe(recipe, phase, folder), callbacks=stop, model=model)
            trainer.train()
            trainer.save_model(str(folder))
            if trainer.accelerator.is_main_process:
                trainer.state.save_to_json(str(folder / "trainer_state.json"))
            model = trainer.accelerator.unwrap_model(trainer.model)
            for entry in trainer.state.log_history:
                tagged = {**entry, "round": r + 1, "phase": phase.name, "step": entry.get("step", 0) + steps}
                round_log.append(tagged)
            if stop and stop[0].stopped_at is None and trainer.accelerator.is_main_process:
                print(f"phase {phase.name} (round {r + 1}): {phase.until.key} never reached the bound in "
                      f"{trainer.state.global_step} steps", flush=True)  # fmt: skip
            steps += trainer.state.global_step
        log += round_log
        if plan.until is not None:
            values = [float(e[plan.until.key]) for e in round_log if plan.until.key in e]
            if plan.until.reached(values):
                stopped = True
                break
    trainer.state.log_history = log
    trainer.args.output_dir = str(root)
    if trainer.accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        (root / "phases.json").write_text(json.dumps({"rounds": r + 1, "stopped": stopped, "steps": steps}))
    return {"trainer": trainer, "log": log, "rounds": r + 1, "stopped": stopped, "steps": steps}
