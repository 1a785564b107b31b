"""Reliability: NaN / inf stops the run or drops the batch, Ctrl-C at any stage keeps what there is and says how to
go on, a folder holding another run is refused or (on request) replaced, and the same recipe gives the same run.

The kill -9 test is tests/test_kill.py; the bad-input table tests/test_bad_input.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import TrainerCallback

import trl_plus
from trl_plus import DPO, LossContext, LossOutput
from trl_plus.run.rundir import read_state
from trl_plus.testing import cli, registered, tiny_trainer, training_logs
from trl_plus.trainers.preference import PlusTrainer

RECIPE = "recipes/quickstart-tiny.yaml"
QUICK = ["data.eval=null", "training.per_device_train_batch_size=4", "training.logging_steps=1",
         "training.disable_tqdm=true"]  # fmt: skip


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


class NanAtStep3(DPO):
    """DPO whose loss is NaN at the third optimizer step (``ctx.step`` counts the steps done)."""

    name = "test-nan-loss"

    def loss(self, ctx: LossContext) -> LossOutput:
        out = super().loss(ctx)
        if ctx.training and ctx.step == 2:
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out


class InfGradAtStep3(DPO):
    """DPO whose loss is finite but whose gradient is not at the third step (d/dx √x at 0 times 0)."""

    name = "test-nan-grad"

    def loss(self, ctx: LossContext) -> LossOutput:
        out = super().loss(ctx)
        if ctx.training and ctx.step == 2:
            out = dataclasses.replace(out, loss=out.loss + torch.sqrt(ctx.token_logps.sum() * 0))
        return out


# -- NaN / inf ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, metric", [(NanAtStep3, "loss is nan"), (InfGradAtStep3, "grad_norm is nan")])
def test_a_non_finite_step_stops_the_run_with_the_last_good_checkpoint_kept(tmp_path, capsys, method, metric):
    with registered(method):
        code = cli("train", RECIPE, *sets(*QUICK, f"method={method.name}", "training.max_steps=5",
                                          "training.save_steps=1", f"training.output_dir={tmp_path}"))  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == (
        f"error: training.nan: {metric} at step 3: training stopped before the optimizer step; the last good "
        f"checkpoint is {tmp_path}/checkpoint-2 (lower training.learning_rate, or set training.nan: skip to drop such "
        "batches)"
    )
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    from safetensors.torch import load_file

    assert all(t.isfinite().all() for t in load_file(str(tmp_path / "checkpoint-2" / "model.safetensors")).values())


class Snapshots(TrainerCallback):
    """The parameters after each optimizer step, by step."""

    def __init__(self):
        self.by_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", [NanAtStep3, InfGradAtStep3])
def test_nan_skip_drops_the_batch_without_an_update_and_counts_it(tmp_path, method):
    snapshots = Snapshots()
    trainer = tiny_trainer(method, tmp_path, max_steps=5, nan="skip", callbacks=[snapshots])
    trainer.train()
    steps = snapshots.by_step
    assert all(torch.equal(steps[3][n], steps[2][n]) for n in steps[2])  # step 3: no update at all
    assert not all(torch.equal(steps[4][n], steps[3][n]) for n in steps[3])  # the others: updates
    state = trainer.optimizer.state[next(iter(trainer.model.parameters()))]
    assert int(state["step"]) == 4  # Adam's moments saw 4 steps of 5
    logs = {e["step"]: e for e in training_logs(trainer)}
    assert [logs[s].get("nan_skipped") for s in range(1, 6)] == [None, None, 1, 1, 1]
    assert all(math.isfinite(logs[s]["loss"]) for s in (4, 5))
    assert all(p.isfinite().all() for p in trainer.model.parameters())


def test_training_nan_is_validated_and_never_reaches_dpo_config(capsys):
    assert cli("validate", RECIPE, *sets("training.nan=skip")) == 0
    capsys.readouterr()
    assert cli("validate", RECIPE, *sets("training.nan=ignore")) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --set training.nan: expected stop (end the run at a non-finite loss or gradient norm) or skip (drop "
        "that batch), got 'ignore'"
    )


# -- Ctrl-C ---------------------------------------------------------------------------------------------------


def interrupt(monkeypatch, target, name, when=lambda self, *a, **k: True):
    original = getattr(target, name)

    def raising(self, *args, **kwargs):
        if when(self, *args, **kwargs):
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(target, name, raising)


def test_ctrl_c_during_an_evaluation_keeps_a_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    interrupt(monkeypatch, PlusTrainer, "evaluate", when=lambda self, *a, **k: self.state.global_step == 2)
    overrides = [*QUICK[1:], "data.eval.limit=8", "training.max_steps=4", "training.eval_steps=2",
                 "training.save_steps=100", f"training.output_dir={tmp_path}"]  # fmt: skip
    assert cli("train", RECIPE, *sets(*overrides)) == 130
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "interrupted: checkpoint saved" in err
    assert "interrupted after 2 steps" in out
    assert f"resume with         --set training.resume_from_checkpoint={tmp_path}/checkpoint-2" in out
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()
    monkeypatch.undo()
    assert cli("train", RECIPE, *sets(*overrides, "training.resume_from_checkpoint=true")) == 0
    assert "finished after 4 steps" in capsys.readouterr().out


def test_ctrl_c_during_the_precompute_pass_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    overrides = [*QUICK, "reference.mode=precomputed", "training.max_steps=2", f"training.output_dir={tmp_path}"]
    interrupt(monkeypatch, PlusTrainer, "_precompute_ref_logps")
    assert cli("train", RECIPE, *sets(*overrides)) == 130
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "interrupted before the first step" in err
    assert "nothing to resume   no step was trained: run the same command to start again" in out
    monkeypatch.undo()
    assert cli("train", RECIPE, *sets(*overrides)) == 0  # a first run: checkpoint-2
    capsys.readouterr()
    interrupt(monkeypatch, PlusTrainer, "_precompute_ref_logps")  # the resumed run is interrupted while it starts
    more = [*overrides, "training.max_steps=4", "training.resume_from_checkpoint=true"]
    assert cli("train", RECIPE, *sets(*more)) == 130
    out = capsys.readouterr().out
    assert f"resume with         --set training.resume_from_checkpoint={tmp_path}/checkpoint-2" in out


def test_ctrl_c_while_the_held_out_pairs_are_scored_before_training(tmp_path, monkeypatch, capsys):
    import trl_plus.run.train as train_module

    def raising(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "score_pairs", raising)
    overrides = [*QUICK[1:], "data.eval.limit=8", "training.max_steps=2", f"training.output_dir={tmp_path}"]
    assert cli("train", RECIPE, *sets(*overrides)) == 130
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "interrupted after 0 steps" in out and "nothing to resume" in out


# -- a folder that holds another run ------------------------------------------------------------------------------


def test_a_folder_holding_another_run_is_refused_in_one_line_or_replaced_on_request(tmp_path, capsys):
    first = [*QUICK, "training.max_steps=1", f"training.output_dir={tmp_path}"]
    assert cli("train", RECIPE, *sets(*first)) == 0
    (tmp_path / "notes.txt").write_text("the old run's")
    capsys.readouterr()
    sft = [*first, "method=sft", "method_args={}", "data.train.columns.completion=chosen"]
    assert cli("train", RECIPE, *sets(*sft)) == 2
    err = capsys.readouterr().err.strip()
    recorded = tmp_path / "trl_plus_recipe.yaml"
    assert err == (
        f"error: {RECIPE}: training.output_dir: {tmp_path} holds a run of dpo on tiny-llama (see {recorded}), not of "
        f"this recipe's sft on tiny-llama; resume that run with its own recipe (`trl-plus train {recorded} --set "
        "training.resume_from_checkpoint=true`), replace it with training.overwrite_output_dir: true, or choose "
        "another training.output_dir"
    )
    assert cli("train", RECIPE, *sets(*sft, "training.overwrite_output_dir=true")) == 0
    assert "finished after 1 steps" in capsys.readouterr().out
    assert read_state(tmp_path)["global_step"] == 1 and not (tmp_path / "notes.txt").exists()
    assert "method: sft" in recorded.read_text()
    assert cli("validate", RECIPE, *sets(*sft, "training.overwrite_output_dir=true",
                                          "training.resume_from_checkpoint=true")) == 2  # fmt: skip
    assert "set only one of them" in capsys.readouterr().err


def test_overwrite_deletes_only_a_trl_plus_run_folder(tmp_path):
    from trl_plus import TrlPlusError
    from trl_plus.run.rundir import clear_run_dir

    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(TrlPlusError, match=r"holds files but no trl-plus run \(trl_plus_recipe.yaml\)"):
        clear_run_dir(tmp_path)
    assert (tmp_path / "thesis.tex").is_file()
    (tmp_path / "trl_plus_recipe.yaml").write_text("method: dpo\n")
    with pytest.raises(TrlPlusError, match=r"holds .*thesis.tex, which overwriting would delete"):
        clear_run_dir(tmp_path, protect=[tmp_path / "thesis.tex"])
    clear_run_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- determinism ----------------------------------------------------------------------------------------------


def test_the_same_recipe_and_seed_give_a_bit_identical_loss_curve(tmp_path):
    runs = []
    for name in ("a", "b"):
        trl_plus.train(RECIPE, [*QUICK, "training.max_steps=3", f"training.output_dir={tmp_path / name}"])
        runs.append([{k: v for k, v in e.items() if not k.startswith("train_")}
                     for e in read_state(tmp_path / name)["log_history"]])  # fmt: skip
    assert runs[0] == runs[1]  # exactly: every metric of every step
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_batch_1_times_accumulation_4_equals_batch_4_for_dpo(tmp_path, optim):
    """The same 4 pairs per step, one batch of 4 or 4 accumulated batches of 1 (transformers divides each micro-batch's
    loss by the accumulation steps; DPO's loss is a batch mean): the same steps, to float32 rounding.

    The weights are compared under SGD: Adam's first update is about ``lr · sign(g)``, so for a gradient component
    near zero the rounding of the two summation orders (padding to the batch's longest sequence, 4 backward passes
    adding into ``.grad``) moves a weight by up to ~lr·1e-3 (5e-6 here), and the later grad norms by ~1e-6."""
    trainers = {}
    for batch, accumulation in ((4, 1), (1, 4)):
        training = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation, "optim": optim}
        trainers[batch] = tiny_trainer("dpo", tmp_path / str(batch), max_steps=3, training=training)
        trainers[batch].train()
    curves = {b: training_logs(t) for b, t in trainers.items()}
    assert [e["step"] for e in curves[1]] == [e["step"] for e in curves[4]] == [1, 2, 3]
    keys = ("loss", "grad_norm", "rewards/margins", "rewards/accuracies") if optim == "sgd" else ("loss",)
    for key in keys:
        for one, four in zip(curves[1], curves[4]):
            assert one[key] == pytest.approx(four[key], abs=1e-6), (key, one["step"])
    if optim == "sgd":
        for (name, p), q in zip(trainers[4].model.named_parameters(), trainers[1].model.parameters()):
            assert (p - q).abs().max().item() <= 1e-6, name
