"""Kill -9 at any moment loses at most the steps since the last checkpoint: ``trl-plus train`` runs are SIGKILLed at
random moments (one always in the middle of writing a checkpoint), each is resumed with
``training.resume_from_checkpoint=true``, and every resumed run ends with the loss curve and the weights of a run
that was never interrupted (1e-6).

``TRL_PLUS_KILL_POINTS=N`` tries N random moments instead of 1 (plus the one during a save);
``TRL_PLUS_KILL_SEED`` replays the moments of a failed run (its seed is in the failure message).
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import trl_plus
from trl_plus.run.rundir import read_state

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/quickstart-tiny.yaml"
STEPS, SAVE_STEPS = 6, 2
OVERRIDES = [
    "data.eval=null", f"training.max_steps={STEPS}", f"training.save_steps={SAVE_STEPS}", "training.logging_steps=1",
    "training.per_device_train_batch_size=4", "training.disable_tqdm=true",
]  # fmt: skip
#: Files every complete checkpoint has (what a resume reads).
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
#: Run in the killed process: ``trl-plus train`` itself, with the save of one checkpoint made slow (between the
#: model's and the optimizer's files, announced by the file ``$SAVING``) so that a kill lands in a save for certain.
LAUNCHER = """
import os, sys, time
from pathlib import Path
from transformers import Trainer
slow_at = int(os.environ.get("SLOW_SAVE_AT", "0"))
save_optimizer = Trainer._save_optimizer_and_scheduler
def slowed(self, output_dir):
    if self.state.global_step == slow_at:
        Path(os.environ["SAVING"]).touch()
        time.sleep(60)
    save_optimizer(self, output_dir)
Trainer._save_optimizer_and_scheduler = slowed
from trl_plus.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(output_dir: Path, slow_at: int = 0) -> subprocess.Popen:
    args = [sys.executable, "-c", LAUNCHER, "train", RECIPE, "--set", *OVERRIDES, f"training.output_dir={output_dir}"]
    env = {**os.environ, "SLOW_SAVE_AT": str(slow_at), "SAVING": str(output_dir) + ".saving", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def curve(output_dir) -> list[dict]:
    """The log history less transformers' closing entry (wall-clock figures, and ``train_loss``: the mean loss of
    the last ``train()`` call, which for a resumed run covers the resumed steps only)."""
    return [entry for entry in read_state(output_dir)["log_history"] if "train_loss" not in entry]


def weights(output_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "model.safetensors"))


def assert_same_run(resumed: Path, reference: Path, moment: str) -> None:
    ours, theirs = curve(resumed), curve(reference)
    assert [e.get("step") for e in ours] == [e.get("step") for e in theirs], moment
    for mine, expected in zip(ours, theirs):
        assert mine.keys() == expected.keys(), (moment, mine.get("step"), mine.keys() ^ expected.keys())
        for key, value in expected.items():
            close = math.isclose(mine[key], value, rel_tol=0, abs_tol=1e-6)
            assert close, (moment, mine["step"], key, mine[key], value)
    a, b = weights(resumed), weights(reference)
    assert a.keys() == b.keys()
    for name in b:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, (moment, name)


def kill_at(points: dict, killed: dict, deadline: float) -> None:
    """SIGKILL each run ``delay`` seconds after its trigger fires (``killed[name]``: whether it was still running)."""
    fired: dict[str, float] = {}
    while len(killed) < len(points) and time.monotonic() < deadline:
        for name, (trigger, delay, proc) in points.items():
            if name in killed:
                continue
            if name not in fired and trigger():
                fired[name] = time.monotonic()
            if (name in fired and time.monotonic() - fired[name] >= delay) or proc.poll() is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed[name] = name in fired and proc.returncode == -signal.SIGKILL
        time.sleep(0.002)


def test_a_run_killed_at_any_moment_resumes_to_the_same_result(tmp_path):
    seed = int(os.environ.get("TRL_PLUS_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    count = int(os.environ.get("TRL_PLUS_KILL_POINTS", "1"))
    folders = [tmp_path / f"killed-{n}" for n in range(count + 1)]
    # the first in the middle of a save (the slow one); the others once a first checkpoint exists (else there is
    # nothing to resume), at a random moment after it: in a step, a save, a log, or the final save
    points = {"in the middle of the save of checkpoint-4": (Path(f"{folders[0]}.saving").exists, 0.0,
                                                              launch(folders[0], slow_at=4))}  # fmt: skip
    for folder in folders[1:]:
        delay = round(rng.uniform(0.0, 3.0), 2)
        points[f"{delay} s after the first checkpoint"] = (lambda f=folder: any(f.glob("checkpoint-*")), delay,
                                                            launch(folder))  # fmt: skip
    killed: dict[str, bool] = {}
    killer = threading.Thread(target=kill_at, args=(points, killed, time.monotonic() + 300))
    killer.start()
    reference = tmp_path / "reference"  # meanwhile: the same recipe, never interrupted
    try:
        trl_plus.train(RECIPE, [*OVERRIDES, f"training.output_dir={reference}"])
    finally:
        killer.join()
    names = list(points)
    assert killed[names[0]], f"the run to kill in the middle of a save was not: {points[names[0]][2].stderr.read()}"

    for name, folder in zip(names, folders):
        moment = f"seed {seed}, kill {name} ({'killed' if killed[name] else 'finished first'})"
        for checkpoint in folder.glob("checkpoint-*"):  # only complete checkpoints bear the name
            missing = [f for f in CHECKPOINT_FILES if not (checkpoint / f).is_file()]
            assert not missing, f"{moment}: {checkpoint.name} lacks {missing}"
        trl_plus.train(RECIPE, [*OVERRIDES, f"training.output_dir={folder}", "training.resume_from_checkpoint=true"])
        assert_same_run(folder, reference, moment)
    print(f"kill points tried: {len(points)} (seed {seed}); killed while running: {sum(killed.values())}")


@pytest.mark.parametrize("leftover", [".tmp-checkpoint-6", "checkpoint-6-partial"])
def test_a_half_written_checkpoint_is_never_picked_for_resume(tmp_path, leftover):
    from trl_plus.run.validate import resume_target

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / leftover).mkdir()
    assert resume_target(True, str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_resuming_from_the_last_steps_checkpoint_trains_no_step_more(tmp_path):
    """A run killed after its last checkpoint, before it ended: transformers alone would train step max_steps + 1."""
    overrides = [*OVERRIDES, "training.max_steps=2", f"training.output_dir={tmp_path}"]
    trl_plus.train(RECIPE, overrides)
    first = curve(tmp_path)
    result = trl_plus.train(RECIPE, [*overrides, "training.resume_from_checkpoint=true"])
    assert result.global_step == 2 and curve(tmp_path) == first
