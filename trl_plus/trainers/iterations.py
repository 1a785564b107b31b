"""Iterated online training (a recipe's ``iterations:`` block; SELM, DNO, DPA, or "iterative" online DPO): per
iteration ``t`` of ``count``,

1. the policy as it stands samples this iteration's prompts (``prompts: slices``: disjoint contiguous slices;
   ``all``: every prompt), the rollout's scorers score them, and :meth:`Method.refresh` (default: the rollout stage
   and :meth:`Method.make_examples` per batch) builds the iteration's rows; each process samples its share and
   every process trains on all of them;
2. the replayed rows join them: ``replay[0]`` of iteration t−1's rows, ``replay[1]`` of t−2's, ... (drawn with
   the run's seed);
3. with ``reference: previous`` the reference becomes a frozen copy of the policy (π_ref ← π_θ: a full copy or
   the frozen ``ref`` adapter; with ``reference.mode: precomputed`` its log-probs on the iteration's rows, computed
   once with the policy as it stands, adapter on — the rows are fixed within an iteration, so this is exact and
   saves the reference forward of every step), so the iteration's first loss is the method's at policy =
   reference (ln 2 for DPO);
4. one ``trainer.train()`` with a fresh optimiser and scheduler and the iteration's ``training`` overrides.

Everything an iteration needs to be redone is under ``output_dir/iter-<t>/``: ``rows.jsonl`` (its own rows),
``replay.json`` (which earlier rows it replayed), its checkpoints, its final weights and ``iteration.json`` once it
has finished. Resume (``resume=True``) skips the finished iterations, loads the last one's policy, promotes it to
reference as the run did, and resumes the first unfinished iteration on its saved rows from its latest checkpoint:
the curve equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object, is_peft_model

from ..contract import IterationContext
from ..data.collate import PromptCollator
from ..errors import TrlPlusError
from .stages import _fresh_optimizer, _last_checkpoint, finish_run

#: Written into an iteration's folder when it has finished.
ITERATION_DONE = "iteration.json"
ROWS_FILE = "rows.jsonl"
REPLAY_FILE = "replay.json"


def iteration_dir(output_dir: str | Path, index: int) -> Path:
    """Where iteration ``index`` (0-based) keeps its rows, checkpoints and weights: ``iter-<index+1>``."""
    return Path(output_dir) / f"iter-{index + 1}"


def iteration_prompts(n: int, count: int, how: str) -> list[range]:
    """The prompt indices of each iteration: ``slices`` splits ``0..n−1`` into ``count`` contiguous parts (the first
    ``n % count`` one longer), ``all`` gives every iteration all of them."""
    if how == "all":
        return [range(n)] * count
    if n < count:
        raise TrlPlusError(f"iterations: {n} prompts cannot make {count} disjoint slices (iterations.prompts: all "
                           "samples every prompt every iteration)")  # fmt: skip
    size, extra = divmod(n, count)
    starts = [i * size + min(i, extra) for i in range(count + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(count)]


def replay_rows(history: list[list[dict[str, Any]]], fractions: list[float], seed: int) -> list[tuple[int, int]]:
    """``(iteration, row)`` indices to replay: ``round(f·len)`` rows of the iteration ``k + 1`` back for the
    ``k``-th fraction, drawn without replacement by ``seed``."""
    rng = random.Random(seed)
    picked = []
    for back, fraction in enumerate(fractions, start=1):
        if back > len(history):
            break
        source = len(history) - back
        size = len(history[source])
        picked += [(source, i) for i in sorted(rng.sample(range(size), round(fraction * size)))]
    return picked


def run_iterations(trainer: Any, plan: Any, resume: bool = False) -> None:
    """Train ``trainer`` iteration by iteration as ``plan`` (a validated ``IterationsSpec``) says (see the module
    docstring). Afterwards ``trainer.state.log_history`` holds every iteration's entries, each with ``iteration``
    (1-based) and a run-wide ``step``; the saved model is the final policy."""
    from datasets import Dataset

    if plan.reference == "previous" and trainer.reference_mode == "none":
        raise TrlPlusError(f"iterations.reference: method {trainer.method.name!r} has no reference to promote")
    if (plan.reference == "initial" and trainer.reference_mode == "precomputed" and trainer.ref_model is None
            and not is_peft_model(trainer.model)):  # fmt: skip
        raise TrlPlusError("iterations.reference: initial with reference.mode: precomputed and full fine-tuning "
                           "needs the initial model after iteration 1: use model.lora, reference.name_or_path, or "
                           "reference.mode: model")  # fmt: skip
    prompts, root = trainer.train_dataset, trainer.args.output_dir
    collate = PromptCollator(getattr(trainer, "_prompt_columns", ("prompt",)))
    parts = iteration_prompts(len(prompts), plan.count, plan.prompts)
    base = {key: getattr(trainer.args, key) for overrides in plan.training for key in overrides}
    history: list[list[dict[str, Any]]] = []
    log: list[dict[str, Any]] = []
    steps, finished = 0, None
    accelerator = trainer.accelerator
    try:
        for t in range(plan.count):
            folder = iteration_dir(root, t)
            rows_file = folder / ROWS_FILE
            if resume and (folder / ITERATION_DONE).is_file():
                history.append(_read_rows(rows_file))
                state = json.loads((folder / "trainer_state.json").read_text())
                log += _iteration_history(state, t, steps)
                steps += json.loads((folder / ITERATION_DONE).read_text())["steps"]
                finished = folder
                continue
            if finished is not None:  # resuming after finished iterations: the last one's policy
                trainer._load_from_checkpoint(str(finished))
                finished = None
            trainer.args.output_dir = str(folder)
            if resume and rows_file.is_file():  # sampled before the interruption: the same rows again
                rows = _read_rows(rows_file)
                replayed = json.loads((folder / REPLAY_FILE).read_text())["rows"]
            else:
                rows = _sample(trainer, collate, prompts.select(parts[t]), t, plan.count, history)
                replayed = replay_rows(history, plan.replay, int(trainer.args.seed) + t)
                if accelerator.is_main_process:
                    folder.mkdir(parents=True, exist_ok=True)
                    _write_rows(rows_file, rows)
                    (folder / REPLAY_FILE).write_text(json.dumps({"rows": replayed, "fractions": plan.replay}))
            if not rows:
                raise TrlPlusError(f"iteration {t + 1}: make_examples built no training row from "
                                   f"{len(parts[t])} prompts' samples (every sample tied?)")  # fmt: skip
            history.append(rows)
            dataset = Dataset.from_list(rows + [history[i][j] for i, j in replayed])
            if trainer.reference_mode == "precomputed":  # rows are fixed within an iteration: one reference pass
                dataset = trainer.reference_columns_for(dataset, initial=t == 0 or plan.reference == "initial")
            elif t > 0 and plan.reference == "previous":
                trainer.train_dataset = dataset
                trainer.refresh_reference()
            trainer.train_dataset = dataset
            trainer._signature_columns = list(dataset.column_names)
            for key, value in {**base, **(plan.training[t] if t < len(plan.training) else {})}.items():
                setattr(trainer.args, key, value)
            _fresh_optimizer(trainer)
            trainer.train(resume_from_checkpoint=_last_checkpoint(folder) if resume else None)
            trainer.save_model(str(folder))
            if accelerator.is_main_process:
                trainer.state.save_to_json(str(folder / "trainer_state.json"))
                done = {"iteration": t + 1, "steps": trainer.state.global_step, "rows": len(rows),
                        "replayed": len(replayed)}  # fmt: skip
                (folder / ITERATION_DONE).write_text(json.dumps(done))
            log += _iteration_history({"log_history": trainer.state.log_history}, t, steps)
            steps += trainer.state.global_step
    except KeyboardInterrupt:  # the caller saves a checkpoint: into the interrupted iteration's folder
        raise
    except BaseException:
        trainer.args.output_dir, trainer.train_dataset = root, prompts
        raise
    finally:
        for key, value in base.items():
            setattr(trainer.args, key, value)
    trainer.args.output_dir, trainer.train_dataset = root, prompts
    finish_run(trainer, finished, log, steps)


def _sample(trainer, collate, prompts, t: int, count: int, history) -> list[dict[str, Any]]:
    """Iteration ``t``'s rows: this process's share of the prompts through :meth:`Method.refresh`, gathered."""
    from tqdm.auto import tqdm

    accelerator = trainer.accelerator
    share = prompts.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    rows = collate([share[i] for i in range(len(share))])["prompt_rows"] if len(share) else []
    batch = trainer.args.per_device_eval_batch_size
    context = IterationContext(index=t, count=count, trainer=trainer, prompts=rows, history=list(history),
                               batch_size=batch)  # fmt: skip
    trainer.model.train()  # (generation switches to eval mode itself); the rollout figures log as training's
    trainer.rollout_seed_offset = 1_000_003 * (t + 1)  # each batch its own seed, the same on a rerun
    quiet = trainer.args.disable_tqdm or not accelerator.is_main_process
    with tqdm(total=len(rows), desc=f"Sampling iteration {t + 1}/{count}", disable=quiet) as bar:

        def progress(done: int) -> None:
            bar.update(done)
            trainer.rollout_seed_offset += 1

        context.progress = progress
        made = trainer.method.refresh(context)
    made = [dict(row) for row in made]
    return gather_object(made) if accelerator.num_processes > 1 else made


def _iteration_history(state: dict[str, Any], t: int, offset: int) -> list[dict[str, Any]]:
    return [{**entry, "step": entry.get("step", 0) + offset, "iteration": t + 1} for entry in state["log_history"]]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
