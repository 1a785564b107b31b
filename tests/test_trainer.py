"""PlusTrainer: what it computes, what it never computes, and the hooks a plugin can use."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from conftest import first_batch, perturb
from trl_plus import LossContext, LossOutput, Method, Needs, Paper, TrlPlusError
from trl_plus.builtin.dpo import DPO
from trl_plus.data.collate import FieldCollation, PairwiseCollator
from trl_plus.models.tiny import build_model, build_tokenizer
from trl_plus.testing import preference_rows, registered, train_tiny
from trl_plus.trainers.preference import PlusTrainer

PAPER = Paper("A test method", "0000.00000")


class MeanLogpFree(Method):
    """Reference-free: −log σ(mean logp chosen − mean logp rejected)."""

    name = "test-free"
    paper = PAPER
    needs = Needs(reference="no")

    def loss(self, ctx: LossContext) -> LossOutput:
        import torch.nn.functional as F

        r = ctx.mean_logps()
        return LossOutput(-F.logsigmoid(r[0] - r[1]).mean(), rewards=r.detach())


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    return calls, handle


def make_trainer(dpo_args, dataset, method, **kwargs):
    tokenizer = build_tokenizer()
    return PlusTrainer(
        build_model(tokenizer), args=dpo_args(), method=method, train_dataset=dataset, processing_class=tokenizer,
        **kwargs,
    )  # fmt: skip


def test_reference_free_method_never_runs_a_reference(dpo_args, pref_dataset):
    trainer = make_trainer(dpo_args, pref_dataset, MeanLogpFree)
    assert trainer.ref_model is None and trainer.reference_mode == "none"
    calls, handle = count_forwards(trainer.model)
    trainer.compute_loss(trainer.model, first_batch(trainer))
    handle.remove()
    assert len(calls) == 1  # the policy forward only


def test_dpo_runs_exactly_one_reference_forward(dpo_args, pref_dataset):
    trainer = make_trainer(dpo_args, pref_dataset, "dpo")
    assert trainer.reference_mode == "model" and trainer.ref_model is not None
    policy_calls, h1 = count_forwards(trainer.model)
    ref_calls, h2 = count_forwards(trainer.ref_model)
    trainer.compute_loss(trainer.model, first_batch(trainer))
    h1.remove(), h2.remove()
    assert (len(policy_calls), len(ref_calls)) == (1, 1)


def test_precomputed_reference_equals_live_reference(dpo_args, pref_dataset):
    live = make_trainer(dpo_args, pref_dataset, "dpo", reference_mode="model")
    pre = make_trainer(dpo_args, pref_dataset, "dpo", reference_mode="precomputed")
    assert pre.ref_model is None and "ref_token_logps" in pre.train_dataset.column_names
    for trainer in (live, pre):
        perturb(trainer.model)
    calls, handle = count_forwards(pre.model)
    with torch.no_grad():
        a = live.compute_loss(live.model, first_batch(live))
        b = pre.compute_loss(pre.model, first_batch(pre))
    handle.remove()
    assert len(calls) == 1
    assert abs(a.item() - math.log(2)) > 1e-3
    assert b.item() == pytest.approx(a.item(), abs=1e-6)


def test_lora_reference_is_the_adapter_switched_off(dpo_args, pref_dataset):
    from peft import LoraConfig

    trainer = make_trainer(
        dpo_args, pref_dataset, "dpo", peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    assert trainer.reference_mode == "adapter" and trainer.ref_model is None
    with torch.no_grad():  # a fresh adapter (B = 0) leaves the policy equal to the reference: loss is log 2
        assert trainer.compute_loss(trainer.model, first_batch(trainer)).item() == pytest.approx(math.log(2), abs=1e-6)


class TeacherPull(Method):
    """Test plugin using the teacher hook: pull the chosen tokens' log-probs toward the teacher's."""

    name = "test-teacher"
    paper = PAPER
    needs = Needs(reference="no", teacher=True)

    def loss(self, ctx: LossContext) -> LossOutput:
        gap = (ctx.token_logps - ctx.teacher) * ctx.mask
        return LossOutput((gap**2).sum() / ctx.mask.sum(), metrics={"teacher/gap": gap.abs().sum() / ctx.mask.sum()})


class TeacherTopK(TeacherPull):
    """Overrides the teacher hook: the teacher's top-2 token ids from full logits."""

    name = "test-teacher-topk"

    def teacher(self, trainer, inputs):
        with torch.no_grad():
            logits = trainer.forward_logits(trainer.teacher_model, inputs).logits
        return logits.topk(2, dim=-1).indices

    def loss(self, ctx):
        assert ctx.teacher.shape[-1] == 2
        return LossOutput(-ctx.mean_logps().mean())


def test_teacher_hook_default_and_override(dpo_args, pref_dataset):
    tokenizer = build_tokenizer()
    teacher = build_model(tokenizer, seed=1)
    with registered(TeacherPull, TeacherTopK):
        with pytest.raises(TrlPlusError, match="teacher"):
            make_trainer(dpo_args, pref_dataset, "test-teacher")
        trainer = make_trainer(dpo_args, pref_dataset, "test-teacher", teacher_model=teacher)
        batch = first_batch(trainer)
        expected = trainer.frozen_token_logps(trainer.teacher_model, batch)
        ctx_teacher = trainer.teacher_outputs(batch)
        assert ctx_teacher.shape == (2, 4, expected.shape[-1])
        assert torch.equal(ctx_teacher.reshape(expected.shape), expected)
        trainer.train()
        gaps = [e["teacher/gap"] for e in trainer.state.log_history if "teacher/gap" in e]
        assert gaps[-1] < gaps[0]  # the student moved toward the teacher
        topk = make_trainer(dpo_args, pref_dataset, "test-teacher-topk", teacher_model=teacher)
        topk.compute_loss(topk.model, first_batch(topk))


class LogitsDPO(DPO):
    """DPO that asks for full logits: the log-probs must equal the fused head's."""

    name = "test-logits-dpo"
    needs = Needs(reference="yes", logits=True, hidden_states=True)

    def loss(self, ctx):
        assert ctx.outputs.logits is not None and ctx.outputs.hidden_states is not None
        return super().loss(ctx)


def test_method_asking_for_logits_matches_fused_path(dpo_args, pref_dataset):
    with registered(LogitsDPO):
        fused = make_trainer(dpo_args, pref_dataset, "dpo")
        full = make_trainer(dpo_args, pref_dataset, "test-logits-dpo")
        for trainer in (fused, full):
            perturb(trainer.model)
        with torch.no_grad():
            a = fused.compute_loss(fused.model, first_batch(fused))
            b = full.compute_loss(full.model, first_batch(full))
        assert b.item() == pytest.approx(a.item(), abs=1e-5)


class ThreeWay(Method):
    """K = 3 sequences per example (best, middle, worst) and a per-example weight field."""

    name = "test-three"
    paper = PAPER
    needs = Needs(reference="no", fields=("weight",))
    data_fields = ("prompt", "best", "middle", "worst")
    sequences_per_example = 3
    tokenized_columns = ("prompt_ids", "seq_ids")

    def tokenize(self, example, tokenizer):
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        seqs = [tokenizer(example[k] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                for k in ("best", "middle", "worst")]  # fmt: skip
        return {"prompt_ids": prompt, "seq_ids": seqs}

    def collator(self, pad_token_id, max_length, truncation_mode="keep_start"):
        def collate(examples):
            from trl.trainer.utils import pad

            ids, completion = [], []
            for k in range(3):
                for ex in examples:
                    ids.append(torch.tensor(ex["prompt_ids"] + ex["seq_ids"][k]))
                    completion.append(torch.tensor([0] * len(ex["prompt_ids"]) + [1] * len(ex["seq_ids"][k])))
            input_ids = pad(ids, padding_value=pad_token_id, padding_side="right")
            return {
                "input_ids": input_ids,
                "attention_mask": pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="right"),
                "completion_mask": pad(completion, padding_value=0, padding_side="right"),
                "weight": torch.tensor([ex["weight"] for ex in examples], dtype=torch.float32),
            }

        return collate

    def loss(self, ctx):
        import torch.nn.functional as F

        r = ctx.mean_logps()
        per_example = -F.logsigmoid(r[0] - r[1]) - F.logsigmoid(r[1] - r[2])
        return LossOutput((ctx.batch["weight"] * per_example).mean(), rewards=r.detach())


def three_way_rows(n=16):
    rows = preference_rows(n)
    return [{"prompt": r["prompt"], "best": r["chosen"], "middle": r["chosen"][:3], "worst": r["rejected"],
             "weight": 1.0 + i % 2} for i, r in enumerate(rows)]  # fmt: skip


def test_any_number_of_sequences_and_extra_fields(tmp_path):
    with registered(ThreeWay):
        trainer = train_tiny("test-three", tmp_path, rows=three_way_rows(), max_steps=6)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_missing_column_names_the_column_and_the_method(dpo_args):
    with registered(ThreeWay):
        with pytest.raises(TrlPlusError, match=r"missing columns 'best', 'middle', 'worst', 'weight'.*'test-three'"):
            make_trainer(dpo_args, Dataset.from_list(preference_rows(4)), "test-three")


def test_mean_token_accuracy_and_method_metrics_are_logged(tmp_path):
    trainer = train_tiny("dpo", tmp_path, max_steps=2)
    first = trainer.state.log_history[0]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy", "num_tokens"):  # fmt: skip
        assert key in first, key
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_lora_precomputed_reference_equals_adapter_off(dpo_args, pref_dataset):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # non-zero B

    live = make_trainer(dpo_args, pref_dataset, "dpo", peft_config=lora())
    pre = make_trainer(dpo_args, pref_dataset, "dpo", peft_config=lora(), reference_mode="precomputed")
    assert (live.reference_mode, pre.reference_mode) == ("adapter", "precomputed")
    with torch.no_grad():
        a = live.compute_loss(live.model, first_batch(live))
        b = pre.compute_loss(pre.model, first_batch(pre))
    assert abs(a.item() - math.log(2)) > 1e-4  # the adapter moved the policy away from the base
    assert b.item() == pytest.approx(a.item(), abs=1e-6)


class OptionalWeight(Method):
    """Reference-free; an optional per-example ``weight`` column scales each pair's loss when the data has it."""

    name = "test-optional"
    paper = PAPER
    needs = Needs(reference="no", optional_fields=("weight",))
    seen: list = []

    def loss(self, ctx):
        import torch.nn.functional as F

        r = ctx.mean_logps()
        weight = ctx.batch.get("weight")
        type(self).seen.append(None if weight is None else weight.tolist())
        losses = -F.logsigmoid(r[0] - r[1])
        return LossOutput((losses if weight is None else weight * losses).mean(), rewards=r.detach())


def test_optional_fields_reach_the_loss_only_when_the_data_has_them(tmp_path):
    rows = preference_rows(8)
    with registered(OptionalWeight):
        OptionalWeight.seen = []
        train_tiny("test-optional", tmp_path / "without", rows=rows, max_steps=1)
        assert OptionalWeight.seen == [None]
        weighted = [{**row, "weight": 0.5 + i} for i, row in enumerate(rows)]
        train_tiny("test-optional", tmp_path / "with", rows=weighted, max_steps=1)
        assert len(OptionalWeight.seen[1]) > 0 and set(OptionalWeight.seen[1]) <= {0.5 + i for i in range(8)}
    assert OptionalWeight.needs.describe() == "reference-free, optional fields weight"


def test_optional_field_missing_in_some_rows_is_an_error():
    collate = FieldCollation(PairwiseCollator(pad_token_id=0, max_length=None), Needs(optional_fields=("weight",)))
    rows = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "weight": w} for w in (1.0, None)]
    with pytest.raises(ValueError, match="'weight' is missing"):
        collate(rows)


def test_without_args_it_builds_on_a_cpu(tmp_path, monkeypatch, pref_dataset):
    monkeypatch.chdir(tmp_path)
    tokenizer = build_tokenizer()
    trainer = PlusTrainer(build_model(tokenizer), method=MeanLogpFree, train_dataset=pref_dataset,
                          processing_class=tokenizer)  # fmt: skip
    assert trainer.args.output_dir == "runs/test-free"
    assert trainer.args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
