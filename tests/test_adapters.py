"""Named trainable adapters in the core: switching leaves ``requires_grad`` alone (peft's own switch does not), one
policy forward per named adapter and none more on the default path, a single named adapter, ``trl-plus generate``
on a plain run and its one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from trl.trainer.utils import use_adapter

from trl_plus import LossOutput, Method, Needs, Paper, TrlPlusError, generate
from trl_plus.testing import build_model, build_tokenizer, cli, preference_rows, registered, tiny_trainer
from trl_plus.trainers.adapters import active_adapter, adapters_off, add_trainable_adapters


def lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def frozen(model, name):
    return [n for n, p in model.named_parameters() if f".{name}." in n and not p.requires_grad]


def test_switching_leaves_requires_grad_alone_and_peft_does_not():
    model = add_trainable_adapters(build_model(build_tokenizer()), {"a": lora(), "b": lora()})
    assert not frozen(model, "a") and not frozen(model, "b")
    ids = torch.tensor([[1, 5, 6, 7]])
    with adapters_off(model):
        base = model(input_ids=ids).logits
        with active_adapter(model, "b"):
            assert torch.equal(model(input_ids=ids).logits, base)  # still off
    with active_adapter(model, "b"):
        assert all(layer.active_adapters == ["b"] for layer in model.modules() if hasattr(layer, "lora_A"))
    assert all(layer.active_adapters == ["a"] for layer in model.modules() if hasattr(layer, "lora_A"))
    assert not frozen(model, "a") and not frozen(model, "b")
    with use_adapter(model, adapter_name=None):  # TRL's / peft's switch: on exit only the active adapter trains
        pass
    assert frozen(model, "b") and not frozen(model, "a")  # the trap the core avoids


class TwoAdapters(Method):
    name = "two-adapters-test"
    paper = Paper("test", "0000.00000")
    needs = Needs(reference="yes", policy_adapters=("one", "two"))

    def loss(self, ctx):
        one, two = ctx.for_adapter("one"), ctx.for_adapter("two")
        assert ctx.for_adapter("one") is ctx and ctx.for_adapter("two") is two  # computed once
        return LossOutput((one.logps() + 2 * two.logps() - 3 * one.ref_logps()).mean())


def forwards(trainer):
    """A counter of the backbone's forward calls."""
    calls = []
    backbone = trainer.accelerator.unwrap_model(trainer.model).get_base_model().model
    backbone.register_forward_hook(lambda *args: calls.append(1))
    return calls


def batch_of(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def test_one_forward_per_named_adapter_and_none_more_on_the_default_path(tmp_path):
    dpo = tiny_trainer("dpo", tmp_path / "dpo", rows=preference_rows(8), peft_config=lora())
    calls = forwards(dpo)
    dpo.compute_loss(dpo.model, batch_of(dpo))
    assert len(calls) == 2  # the policy and the reference (adapter off): the default path adds no forward
    assert dpo.trained_adapters == ["default"] and not dpo.named_adapters
    with registered(TwoAdapters):
        two = tiny_trainer("two-adapters-test", tmp_path / "two", rows=preference_rows(8),
                           peft_config={"one": lora(), "two": lora()})  # fmt: skip
        calls = forwards(two)
        two.compute_loss(two.model, batch_of(two)).backward()
        assert len(calls) == 3  # one, two, the reference (every adapter off)
        policy = two.accelerator.unwrap_model(two.model)
        assert set(policy.peft_config) == {"one", "two"}
        for name in ("one", "two"):
            grads = [p.grad for n, p in policy.named_parameters() if f".lora_B.{name}." in n]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_method_reading_adapters_the_policy_lacks_is_refused(tmp_path):
    with registered(TwoAdapters), pytest.raises(TrlPlusError, match="missing two"):
        tiny_trainer("two-adapters-test", tmp_path, rows=preference_rows(8), peft_config={"one": lora()})
    with registered(TwoAdapters), pytest.raises(TrlPlusError, match="lr_scale: must be > 0"):
        tiny_trainer("two-adapters-test", tmp_path, rows=preference_rows(8), peft_config={"one": lora(), "two": lora()},
                     adapter_lr_scales={"one": 1.0, "two": 0.0})  # fmt: skip


def test_a_single_named_adapter_trains_and_saves_under_its_name(tmp_path):
    trainer = tiny_trainer("dpo", tmp_path, rows=preference_rows(8), max_steps=1, peft_config={"only": lora()},
                           adapter_lr_scales={"only": 2.0})  # fmt: skip
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert set(policy.peft_config) == {"only"}  # TRL's "ref" copy and the "default" alias are gone
    trainer.train()
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == pytest.approx([2 * 5e-3])
    trainer.save_model()
    assert (tmp_path / "only" / "adapter_model.safetensors").is_file()


def test_generate_from_a_plain_run_and_its_one_line_errors(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes/quickstart-tiny.yaml"  # full fine-tuning
    assert cli("train", str(recipe), "--set", "training.max_steps=1", f"training.output_dir={out}", "data.eval=null",
               "training.save_strategy='no'", "data.train.limit=8") == 0  # fmt: skip
    texts = generate(out, ["Add 2 and 3."], max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0], str)
    assert cli("generate", str(out), "--prompt", "Add 2 and 3.", "--max-new-tokens", "2") == 0
    assert cli("generate", str(out), "--prompt", "Add 2 and 3.", "--max-new-tokens", "4", "--scorer", "length",
               "--scorer", "keyword:keyword=a,count=true") == 0  # fmt: skip
    out_lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[length [0-9.]+  keyword [0-9]+\]", out_lines[-1]), out_lines
    assert cli("generate", str(out), "--prompt", "x", "--scorer", "digit") == 2
    assert "unknown scorer 'digit' (did you mean digits?)" in capsys.readouterr().err
    assert cli("generate", str(out), "--prompt", "x", "--scorer", "exact-answer") == 2
    assert "reads the data column(s) answer" in capsys.readouterr().err
    assert cli("generate", str(out), "--prompt", "x", "--scorer", "keyword") == 2
    assert "--scorer keyword: keyword: Field required" in capsys.readouterr().err
    assert cli("generate", str(out), "--prompt", "x", "--weights", "0.5,0.5") == 2
    assert "--weights: method 'dpo' has nothing to mix at inference" in capsys.readouterr().err
    assert cli("generate", str(out), "--prompt", "x", "--weights", "a,b") == 2
    assert cli("generate", str(tmp_path), "--prompt", "x") == 2
    err = capsys.readouterr().err
    assert "--weights: expected numbers" in err and "no trl_plus_recipe.yaml" in err and "Traceback" not in err
