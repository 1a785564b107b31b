"""Frozen sources (issue 11): named teachers as models, frozen adapters on the policy's base or precomputed
columns; the column cache (teachers and the reference); the policy's logits at scored positions."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from trl_plus import (
    LossOutput,
    Method,
    Needs,
    Paper,
    PlusTrainer,
    Teacher,
    TopK,
    TrlPlusError,
)
from trl_plus.testing import (
    build_model,
    build_tokenizer,
    preference_rows,
    registered,
    save_tiny_adapter,
    save_tiny_model,
    tiny_trainer,
    train_tiny,
    training_logs,
    write_jsonl,
)

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


class Probe(Method):
    """Reads a guide's label log-probs and top-3, and the policy at the guide's top-3 ids; its loss is DPO's with
    the guide's log-probs as a margin (so it trains and every output is used)."""

    name = "test-guided"
    paper = Paper("test", "0000.00000")
    needs = Needs(teachers={"guide": ("logps", TopK(3))}, scored_logits=True)

    def loss(self, ctx):
        guide = ctx.frozen["guide"]
        at_top = ctx.logps_at(guide.topk_ids)  # [K, B, T, 3]
        ratio = ctx.logps() - ctx.ref_logps()
        margin = (guide.logps * ctx.mask).sum(-1)
        logits = 0.1 * (ratio[0] - ratio[1]) + 1e-3 * (margin[0] - margin[1])
        loss = -torch.nn.functional.logsigmoid(logits).mean() + 1e-3 * -(at_top.exp() * ctx.mask[..., None]).sum()
        return LossOutput(loss, rewards=0.1 * ratio.detach())


class Logits(Method):
    """Reads two guides' scored logits and the policy's."""

    name = "test-two-guides"
    paper = Paper("test", "0000.00000")
    needs = Needs(reference="no", teachers={"a": "logits", "b": ("logits", "hidden_states")}, scored_logits=True)

    def loss(self, ctx):
        policy = ctx.scored_logits().log_softmax(-1)
        a = ctx.frozen["a"].logits.log_softmax(-1)
        return LossOutput((policy.exp() * (policy - a)).sum(-1).mean())


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_PLUS_CACHE", str(tmp_path / "cache"))


def batch_of(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def full_logps(trainer, model, batch):
    """``[K, B, T, V]`` log-softmax of ``model``'s full logits at the label positions (the plain reference)."""
    with torch.no_grad():
        logits = trainer.forward_logits(model, batch).logits[:, :-1]
    return trainer.to_grid(batch, logits.float().log_softmax(-1))


def test_live_teacher_outputs_equal_the_teacher_model(tmp_path):
    tokenizer = build_tokenizer()
    with registered(Probe, Logits):
        trainer = tiny_trainer("test-guided", tmp_path / "a", teachers={"guide": build_model(tokenizer, seed=1)})
        batch = batch_of(trainer)
        guide = trainer.frozen_outputs("guide", batch)
        expected = full_logps(trainer, trainer.teacher_models["guide"], batch)
        mask = trainer.to_grid(batch, batch["completion_mask"][:, 1:]).bool()
        labels = trainer.to_grid(batch, batch["input_ids"][:, 1:])
        top = expected.topk(3, -1)
        assert torch.equal(guide.topk_ids[mask], top.indices[mask])
        assert torch.allclose(guide.topk_logps[mask], top.values[mask], atol=1e-6)
        assert (guide.topk_ids[~mask] == -1).all() and (guide.topk_logps[~mask] == 0).all()
        assert torch.allclose(guide.logps[mask], expected.gather(-1, labels[..., None])[..., 0][mask], atol=1e-5)

        two = tiny_trainer("test-two-guides", tmp_path / "b", teachers={"a": build_model(tokenizer, seed=1),
                                                                        "b": build_model(tokenizer, seed=2)})
        outputs = two.frozen_outputs("b", batch)
        with torch.no_grad():
            logits = two.forward_logits(two.teacher_models["b"], batch).logits[:, :-1]
        assert outputs.logits.shape == (int(mask.sum()), len(tokenizer))  # [M, V]: scored positions only
        assert torch.allclose(outputs.logits, two.to_grid(batch, logits)[mask], atol=1e-5)
        assert outputs.hidden_states.shape[:3] == mask.shape
        two.train()  # the policy's scored logits take gradients
        assert training_logs(two)[-1]["loss"] < training_logs(two)[0]["loss"]


def test_policy_logps_at_ids_equal_the_full_softmax_with_gradient(tmp_path):
    with registered(Probe):
        trainer = tiny_trainer("test-guided", tmp_path, teachers={"guide": build_model(build_tokenizer(), seed=1)})
        batch = trainer._prepare_inputs(batch_of(trainer))
        model = trainer.model
        (token_logps, _), head = trainer.policy_head(model, batch, lambda: trainer.fused_token_logps(model, batch))
        ids = torch.randint(0, head.weight.size(0), (*head.hidden.shape[:3], 5))
        mask = trainer.to_grid(batch, batch["completion_mask"][:, 1:]).bool()
        from trl_plus import LossContext

        ctx = LossContext(token_logps=trainer.to_grid(batch, token_logps), mask=mask.float(), head=head)
        got = ctx.logps_at(ids)
        logits = trainer.forward_logits(model, batch).logits[:, :-1]
        want = trainer.to_grid(batch, logits.float().log_softmax(-1)).gather(-1, ids) * mask[..., None]
        assert torch.allclose(got, want, atol=1e-6)
        (grad_got,) = torch.autograd.grad(got.sum(), model.lm_head.weight, retain_graph=True)
        (grad_want,) = torch.autograd.grad(want.sum(), model.lm_head.weight)
        assert torch.allclose(grad_got, grad_want, atol=1e-5)
        assert torch.allclose(ctx.scored_logits(), trainer.to_grid(batch, logits)[mask], atol=1e-5)


def test_precomputed_equals_live_and_the_cache_is_reused(tmp_path):
    tokenizer = build_tokenizer()
    teacher_dir = save_tiny_model(tmp_path / "teacher", seed=1)
    from trl_plus.trainers.columns import folder_identity

    loads = []

    def loader():
        loads.append(1)
        return AutoModelForCausalLM.from_pretrained(teacher_dir)

    with registered(Probe):
        live = tiny_trainer("test-guided", tmp_path / "live", teachers={"guide": loader()})
        loads.clear()
        kwargs = dict(reference_mode="precomputed", reference_identity="the tiny model, seed 0")
        pre = tiny_trainer("test-guided", tmp_path / "pre", teachers={"guide": Teacher(
            loader, mode="precomputed", identity=folder_identity(teacher_dir))}, **kwargs)
        assert loads == [1] and pre.column_cache_hits == 0
        a, b = live.frozen_outputs("guide", batch_of(live)), pre.frozen_outputs("guide", batch_of(pre))
        assert torch.allclose(a.logps, b.logps, atol=1e-6) and torch.equal(a.topk_ids, b.topk_ids)
        assert torch.allclose(a.topk_logps, b.topk_logps, atol=1e-6)
        assert "guide" not in pre.teacher_models  # freed after the pass

        # another run (output_dir, learning rate): no teacher load, no reference forward, the same columns
        calls = []
        original = PlusTrainer.frozen_token_logps
        PlusTrainer.frozen_token_logps = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
        try:
            again = tiny_trainer("test-guided", tmp_path / "again", learning_rate=1e-4, teachers={"guide": Teacher(
                loader, mode="precomputed", identity=folder_identity(teacher_dir))}, **kwargs)
        finally:
            PlusTrainer.frozen_token_logps = original
        assert loads == [1] and calls == [] and again.column_cache_hits == 2  # the teacher's and the reference's
        assert torch.equal(again.frozen_outputs("guide", batch_of(again)).topk_ids, b.topk_ids)
        again.train()

        # other weights in the teacher's file: computed again (the key holds the file's digest, so a file rewritten
        # with the same bytes is still a hit); one changed data row: computed again
        build_model(tokenizer, seed=3).save_pretrained(teacher_dir)
        changed = tiny_trainer("test-guided", tmp_path / "changed", teachers={"guide": Teacher(
            loader, mode="precomputed", identity=folder_identity(teacher_dir))}, **kwargs)
        assert loads == [1, 1] and changed.column_cache_hits == 1  # the reference's columns still hold
        rows = preference_rows(32)
        rows[5] = {**rows[5], "chosen": rows[5]["chosen"] + " Indeed."}
        other = tiny_trainer("test-guided", tmp_path / "rows", rows=rows, teachers={"guide": Teacher(
            loader, mode="precomputed", identity=folder_identity(teacher_dir))}, **kwargs)
        assert loads == [1, 1, 1] and other.column_cache_hits == 0


def test_adapter_teacher_equals_the_merged_model_and_gets_no_gradient(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    adapter = save_tiny_adapter(base, tmp_path / "guide")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    with registered(Probe):
        trainer = tiny_trainer("test-guided", tmp_path / "out", model=AutoModelForCausalLM.from_pretrained(base),
                               peft_config=LoraConfig(**LORA), teachers={"guide": Teacher(adapter=adapter)},
                               max_steps=2, training={"save_strategy": "steps", "save_steps": 2})  # fmt: skip
        live = tiny_trainer("test-guided", tmp_path / "live", model=AutoModelForCausalLM.from_pretrained(base),
                            peft_config=LoraConfig(**LORA), teachers={"guide": merged})  # fmt: skip
        pre = tiny_trainer("test-guided", tmp_path / "pre", model=AutoModelForCausalLM.from_pretrained(base),
                           peft_config=LoraConfig(**LORA), teachers={"guide": Teacher(adapter=adapter,
                                                                                      mode="precomputed")})
        batch = batch_of(trainer)
        a, b = trainer.frozen_outputs("guide", batch), live.frozen_outputs("guide", batch)
        assert torch.allclose(a.logps, b.logps, atol=1e-5) and torch.equal(a.topk_ids, b.topk_ids)
        c = pre.frozen_outputs("guide", batch_of(pre))
        assert torch.allclose(a.logps, c.logps, atol=1e-6) and torch.equal(a.topk_ids, c.topk_ids)
        assert "teacher_guide" not in pre.accelerator.unwrap_model(pre.model).peft_config  # columns only now

        policy = trainer.accelerator.unwrap_model(trainer.model)
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        loss.backward()
        lora = {n: p for n, p in policy.named_parameters() if "lora_" in n}
        assert all(p.grad is None and not p.requires_grad for n, p in lora.items() if ".teacher_guide." in n)
        assert all(p.grad is not None for n, p in lora.items() if ".default." in n and "lora_B" in n)
        trainer.model.zero_grad()
        trainer.train()
        trainer.save_model()
        for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-2"):  # the trained adapter only
            assert (folder / "adapter_model.safetensors").is_file() and not (folder / "teacher_guide").exists()
        # the teacher adapter counts its own bytes, not a second base
        teacher = sum(p.numel() for n, p in policy.named_parameters() if ".teacher_guide." in n)
        assert 0 < teacher < 0.2 * sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n)


def test_teacher_errors_name_the_teacher(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    other = save_tiny_model(tmp_path / "other")
    adapter = save_tiny_adapter(other, tmp_path / "guide")
    with registered(Probe):
        with pytest.raises(TrlPlusError, match="teachers.guide: method 'test-guided' needs a teacher named 'guide'"):
            tiny_trainer("test-guided", tmp_path / "a")
        with pytest.raises(TrlPlusError, match="teachers.gide: .* uses no teacher named 'gide' \\(did you mean guide\\?\\)$"):
            tiny_trainer("test-guided", tmp_path / "a", teachers={"guide": build_model(), "gide": build_model()})
        with pytest.raises(TrlPlusError, match="teachers.guide.adapter: a frozen adapter rides the policy's own LoRA"):
            tiny_trainer("test-guided", tmp_path / "a", teachers={"guide": Teacher(adapter=adapter)})
        with pytest.raises(TrlPlusError, match=r"teachers.guide.adapter: .* was trained on .*other, the policy is "):
            tiny_trainer("test-guided", tmp_path / "a", model=AutoModelForCausalLM.from_pretrained(base),
                         peft_config=LoraConfig(**LORA), teachers={"guide": Teacher(adapter=adapter)})
        wider = build_tokenizer()
        wider.add_tokens([f"<extra{i}>" for i in range(18)])
        wide = build_model(wider)
        with pytest.raises(TrlPlusError, match="teachers.guide: the teacher model's vocabulary has 120 tokens, the "
                                               "policy's 102"):  # fmt: skip
            tiny_trainer("test-guided", tmp_path / "a", teachers={"guide": wide})
    with registered(Logits):
        with pytest.raises(TrlPlusError, match="teachers.a.mode: precomputed columns hold label log-probs and top-k"):
            tiny_trainer("test-two-guides", tmp_path / "a", teachers={
                "a": Teacher(build_model(), mode="precomputed"), "b": build_model()})


def recipe(tmp_path, teachers: str, lora: bool = False) -> str:
    data = write_jsonl(preference_rows(8), tmp_path / "pairs.jsonl")
    text = f"""method: test-guided
model: {{name_or_path: tiny-llama{', lora: {r: 4, alpha: 8}' if lora else ''}}}
{teachers}
data: {{train: {{path: {data}}}, eval: null}}
training: {{max_steps: 1, per_device_train_batch_size: 4, disable_tqdm: true, report_to: none,
           output_dir: {tmp_path / 'run'}, activation_checkpointing: false}}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_teachers_block(tmp_path, capsys):
    from trl_plus.testing import cli

    teacher_dir = save_tiny_model(tmp_path / "teacher", seed=1)
    capsys.readouterr()
    with registered(Probe):
        for block, message in [
            ("", "teachers.guide: method 'test-guided' needs a teacher named 'guide'"),
            (f"teachers: {{guide: {{name_or_path: {teacher_dir}}}, extra: {{name_or_path: {teacher_dir}}}}}",
             "teachers.extra: method 'test-guided' uses no teacher named 'extra'"),
            ("teachers: {guide: {adapter: nowhere}}", "teachers.guide.adapter: a frozen adapter rides the policy"),
            ("teachers: {guide: {}}", "teachers.guide: give one of name_or_path"),
            (f"teachers: {{guide: {{name_or_path: {teacher_dir}, mode: cached}}}}", "teachers.guide.mode"),
        ]:
            assert cli("validate", recipe(tmp_path, block)) == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, err
        assert cli("validate", recipe(tmp_path, "teachers: {guide: {adapter: nowhere}}", lora=True)) == 2
        assert "is not a LoRA adapter folder (no adapter_config.json" in capsys.readouterr().err

        # another tokenizer: named before the teacher loads
        tokenizer = build_tokenizer()
        tokenizer.add_tokens(["<extra>"])
        tokenizer.save_pretrained(tmp_path / "teacher")
        assert cli("train", recipe(tmp_path, f"teachers: {{guide: {{name_or_path: {teacher_dir}}}}}")) == 2
        err = capsys.readouterr().err
        assert "teachers.guide: the teacher's tokenizer differs from the policy's (103 vs 102 tokens; '<extra>'" in err
        build_tokenizer().save_pretrained(tmp_path / "teacher")
        block = f"teachers: {{guide: {{name_or_path: {teacher_dir}, mode: precomputed}}}}"
        assert cli("train", recipe(tmp_path, block)) == 0
        assert list((tmp_path / "cache" / "columns").glob("*.arrow"))  # the precomputed guide, cached


def test_legacy_teacher_block_and_needs_teacher_still_work(tmp_path):
    class Legacy(Method):
        name = "test-legacy-teacher"
        paper = Paper("test", "0000.00000")
        needs = Needs(reference="no", teacher=True)

        def loss(self, ctx):
            gap = (ctx.token_logps - ctx.teacher) * ctx.mask
            return LossOutput((gap**2).sum() / ctx.mask.sum())

    with registered(Legacy):
        trainer = train_tiny("test-legacy-teacher", tmp_path, max_steps=3, learning_rate=1e-3,
                             teachers={"teacher": Teacher(build_model(build_tokenizer(), seed=1), mode="precomputed")})
        assert "frozen_teacher_logps" in trainer.train_dataset.column_names
        assert training_logs(trainer)[-1]["loss"] < training_logs(trainer)[0]["loss"]


def test_precomputed_top_k_under_prefix_sharing_is_the_plain_rows(tmp_path):
    """A precomputed top-k teacher in a prefix-sharing run reads the plain rows' hidden states (the shared layout
    holds the prompt once: its positions are not the plain ones)."""
    class TopOnly(Probe):  # reads the guide's top-k, not the policy's logits: the run may share prefixes
        name = "test-guided-top"
        needs = Needs(teachers={"guide": ("logps", TopK(3))})

        def loss(self, ctx):
            return LossOutput(-(ctx.logps() - ctx.ref_logps()).mean())

    teacher = build_model(build_tokenizer(), seed=1)
    with registered(TopOnly):
        live = tiny_trainer("test-guided-top", tmp_path / "live", teachers={"guide": teacher})
        shared = tiny_trainer("test-guided-top", tmp_path / "shared", prefix_sharing=True,
                              teachers={"guide": Teacher(teacher, mode="precomputed")})
        assert shared.prefix_sharing  # a precomputed teacher keeps the run on the shared path
        a, b = live.frozen_outputs("guide", batch_of(live)), shared.frozen_outputs("guide", batch_of(shared))
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.allclose(a.topk_logps, b.topk_logps, atol=1e-6)
        assert torch.allclose(a.logps, b.logps, atol=1e-6)
