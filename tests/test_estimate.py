"""``trl-plus estimate``: exact parameter, LoRA and optimiser-state bytes on the tiny model, every 7B recipe offline
from a local config with no weight loaded, and the GPU check's ``--tiny`` path (so the script cannot rot)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_plus.config import LoraSpec, ModelSpec, QuantizationSpec, load_recipe
from trl_plus.errors import TrlPlusError
from trl_plus.run.estimate import (
    estimate,
    lora_parameters,
    meta_model,
    quantized_weight_bytes,
)
from trl_plus.testing import cli

ROOT = Path(__file__).resolve().parents[1]
MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "intermediate_size": 14336, "vocab_size": 32000, "max_position_embeddings": 32768,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}  # fmt: skip
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> str:
    """A folder holding only a Mistral-7B-shaped config.json (no weights, no tokenizer)."""
    folder = tmp_path_factory.mktemp("mistral-7b-config")
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B))
    return str(folder)


def forbid_weights(monkeypatch) -> None:
    """No hub access, and any attempt to load weights fails the test."""
    import huggingface_hub.constants
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import: set it too

    def no_weights(*args, **kwargs):
        raise AssertionError("the estimate loaded weights")

    for cls in (transformers.PreTrainedModel, transformers.AutoModelForCausalLM, transformers.AutoModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_weights))


@pytest.fixture
def offline(monkeypatch):
    """:func:`forbid_weights` for the whole test."""
    forbid_weights(monkeypatch)


def recipe(model: dict, training: dict | None = None, **blocks) -> dict:
    return {"method": "dpo", "model": model, "data": {"train": {"path": "unused.jsonl"}},
            "training": {"per_device_train_batch_size": 2, "max_length": 64, **(training or {})}, **blocks}  # fmt: skip


def line(result, name: str) -> int:
    return next(x.bytes for x in result.lines if x.name.startswith(name))


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_full_model_weights_gradients_and_adamw_state_are_exact(tiny_model_dir, optim, offline):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    result = estimate(load_recipe(recipe({"name_or_path": tiny_model_dir, "dtype": "float32"}, {"optim": optim})))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir), dtype=torch.float32)
    weights = sum(tensor_bytes(p) for p in model.parameters())
    assert line(result, "base weights") == weights
    assert line(result, "gradients") == weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=optim.endswith("fused"))
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    state = [(k, v) for s in optimizer.state.values() for k, v in s.items()]
    on_device = [v for k, v in state if k != "step" or optim.endswith("fused")]  # unfused: step lives on the CPU
    assert line(result, "optimiser") == sum(tensor_bytes(v) for v in on_device)


def test_4bit_weights_equal_bitsandbytes_bytes_as_trl_plus_loads_them(tiny_model_dir):
    from trl_plus.models.load import load_model

    quant = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    spec = {"name_or_path": tiny_model_dir, "dtype": "bfloat16", "quantization": quant}
    with pytest.MonkeyPatch.context() as mp:
        forbid_weights(mp)
        result = estimate(load_recipe(recipe(spec)))
    model = load_model(ModelSpec(**spec))  # 4-bit on the CPU, then peft's prepare_model_for_kbit_training
    total = 0
    for p in model.parameters():
        total += tensor_bytes(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += sum(tensor_bytes(t) for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code))
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    assert line(result, "base weights") == total


def test_quantized_layout_by_hand():
    # 4096 x 14336: 29,360,128 packed bytes, 458,752 uint8 absmax, 1,792 float32 nested absmax, offset, two codes
    n = 4096 * 14336
    assert quantized_weight_bytes(n, QuantizationSpec()) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 1024 + 64
    assert quantized_weight_bytes(n, QuantizationSpec(double_quant=False)) == n // 2 + 4 * (n // 64) + 64


@pytest.mark.parametrize("lora", [LoraSpec(r=4, target_modules="all-linear"),
                                  LoraSpec(r=8, target_modules=["q_proj", "v_proj"], layers=[1]),
                                  LoraSpec(r=2, target_modules=["q_proj", "embed_tokens"])])  # fmt: skip
def test_lora_count_equals_peft_on_the_real_tiny_model(tiny_model_dir, lora):
    from peft import get_peft_model
    from transformers import AutoConfig

    from trl_plus.models.load import lora_config
    from trl_plus.testing import build_model

    real = get_peft_model(build_model(), lora_config(lora))
    expected = sum(p.numel() for p in real.parameters() if p.requires_grad)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    shapes = lora_parameters(meta_model(config), ModelSpec(name_or_path=tiny_model_dir, lora=lora))
    assert sum(math.prod(s) for _, s in shapes) == expected > 0


def test_mistral_7b_lora_count_by_hand(mistral_dir, offline):
    spec = {"name_or_path": mistral_dir, "lora": {"r": 16, "target_modules": ALL_LINEAR}}
    result = estimate(load_recipe(recipe(spec)))
    h, kv, i = 4096, 1024, 14336
    per_layer = 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert line(result, "LoRA parameters") == 32 * per_layer * 2  # dtype auto: the config's bfloat16
    assert 32 * per_layer == 41_943_040


SEVEN_B = sorted(p for p in (ROOT / "recipes").glob("*.yaml")
                 if not p.name.startswith("quickstart") and load_recipe(p).model.kind != "diffusion")  # fmt: skip


def test_a_diffusion_recipe_is_refused_in_one_line(capsys):
    assert cli("estimate", str(ROOT / "recipes" / "diffusion-dpo.yaml")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a diffusion pipeline is not estimated yet" in err[0]


@pytest.mark.parametrize("path", SEVEN_B, ids=lambda p: p.name)
def test_every_7b_recipe_breaks_down_offline_without_loading_weights(path, mistral_dir, offline, capsys):
    sets = [f"model.name_or_path={mistral_dir}"]
    raw = load_recipe(path)
    if raw.reference.name_or_path:
        sets.append(f"reference.name_or_path={mistral_dir}")
    if raw.teacher is not None:
        sets.append(f"teacher.name_or_path={mistral_dir}")
    assert cli("estimate", str(path), "--set", *sets) == 0
    out = capsys.readouterr().out
    assert "base weights" in out and "total" in out and "fits: 8 GB" in out


def test_the_7b_qlora_dpo_goal_setup(mistral_dir, offline):
    """recipes/dpo.yaml at 2,048 tokens, batch 1, checkpointing: the figures the README quotes."""
    sets = [f"model.name_or_path={mistral_dir}", "training.max_length=2048", "training.per_device_train_batch_size=1"]
    result = estimate(load_recipe(ROOT / "recipes/dpo.yaml", sets))
    assert result.setup["tokens"].startswith("4096 ")
    assert line(result, "LoRA parameters") == 41_943_040 * 2  # bfloat16: TRL casts a quantised model's adapters
    assert line(result, "activations: checkpoints") == 32 * 4096 * 4096 * 4  # float32 residual stream
    assert line(result, "reference") == 0  # adapter off
    assert result.verdicts()[12] and not result.verdicts()[8]


def test_upcast_false_meets_the_10_gb_goal(mistral_dir, offline):
    """``quantization.upcast: false`` keeps the unquantised weights (and so the residual stream) in bf16: the goal
    of ≤ 10 GB on the card for the 7B QLoRA DPO recipe at 2,048 tokens, batch 1, checkpointing."""
    sets = [f"model.name_or_path={mistral_dir}", "training.max_length=2048", "training.per_device_train_batch_size=1"]
    upcast = estimate(load_recipe(ROOT / "recipes/dpo.yaml", sets))
    kept = estimate(load_recipe(ROOT / "recipes/dpo.yaml", [*sets, "model.quantization.upcast=false"]))
    assert line(kept, "activations: checkpoints") == 32 * 4096 * 4096 * 2  # bf16 residual stream
    rest = 2 * 32000 * 4096 + 65 * 4096  # embeddings + lm_head, 65 norms: 2 bytes instead of 4
    assert line(upcast, "base weights") - line(kept, "base weights") == 2 * rest
    assert kept.total <= 10 * 1000**3 < upcast.total


def test_upcast_false_loads_a_trainable_4bit_model_in_its_dtype(tmp_path):
    """The loader's two 4-bit preparations: peft's (float32 norms/embeddings) and upcast: false (bf16 kept); both
    freeze the base and feed gradients to the inputs of checkpointed layers."""
    import torch

    from trl_plus.config import ModelSpec, QuantizationSpec
    from trl_plus.models.load import load_model

    for upcast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        spec = ModelSpec(name_or_path="tiny-llama", dtype="bfloat16",
                         quantization=QuantizationSpec(compute_dtype="bfloat16", upcast=upcast))  # fmt: skip
        model = load_model(spec)
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        assert norms and all(p.dtype == dtype and not p.requires_grad for p in norms), upcast
        assert model.get_input_embeddings().weight.dtype == dtype
        assert model.is_gradient_checkpointing


def test_checkpointing_and_a_reference_copy_change_what_they_should(mistral_dir, offline):
    base = {"name_or_path": mistral_dir, "dtype": "bfloat16"}
    on = estimate(load_recipe(recipe(base, {"activation_checkpointing": True})))
    off = estimate(load_recipe(recipe(base, {"activation_checkpointing": False})))
    assert off.allocated > on.allocated
    frozen = estimate(load_recipe(recipe(base, reference={"mode": "model"})))
    assert line(frozen, "reference (model)") == line(frozen, "base weights")  # the same bf16 weights again


def test_json_and_unknown_optimiser(mistral_dir, offline, capsys):
    path = str(ROOT / "recipes/dpo.yaml")
    assert cli("estimate", path, "--json", "--set", f"model.name_or_path={mistral_dir}") == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["fits"]) == {"8GB", "12GB", "16GB", "24GB", "48GB", "80GB"}
    assert data["total_bytes"] > data["allocated_bytes"] == sum(x["bytes"] for x in data["lines"]
                                                                if x["phase"] != "head")  # fmt: skip
    assert cli("estimate", path, "--set", f"model.name_or_path={mistral_dir}", "training.optim=lomo") == 2
    assert "training.optim: the estimate knows adamw_torch" in capsys.readouterr().err


def test_a_hub_name_without_a_reachable_config_is_one_line(offline, capsys):
    with pytest.raises(TrlPlusError, match=r"model.name_or_path: cannot read the config of 'nobody/no-such-7b'.*"
                                           r"pass a local model directory"):  # fmt: skip
        estimate(load_recipe(recipe({"name_or_path": "nobody/no-such-7b"})))


def test_gpu_check_refuses_without_cuda_and_its_tiny_path_runs():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    script = str(ROOT / "bench/gpu_check.py")
    refused = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU here; run it on one, or use --tiny for the CPU smoke run"]
    # timeout: a hang guard (the tiny run takes 10-25 s on 2 loaded cores)
    tiny = subprocess.run([sys.executable, script, "--tiny"], capture_output=True, text=True, env=env, timeout=180)
    assert tiny.returncode == 0, tiny.stderr[-2000:]
    assert "PlusTrainer dpo, plain" in tiny.stdout and "trl.DPOTrainer" in tiny.stdout
    assert "/ TRL" in tiny.stdout


def test_scored_logits_and_live_logits_teachers_are_counted(mistral_dir, offline):
    """A method reading the policy's scored logits and two live teachers' logits (AlignDistil's shape) pays
    ``[M, V]`` tensors at M = every token (an upper bound): 12 B per element for the policy's, 4 for each teacher's;
    a precomputed teacher costs nothing on the accelerator."""
    from trl_plus import LossOutput, Method, Needs, Paper
    from trl_plus.testing import registered

    class TwoTeachers(Method):
        name = "test-two-logits"
        paper = Paper("test", "0000.00000")
        needs = Needs(reference="no", teachers={"dpo": "logits", "rev": "logits"}, scored_logits=True)

        def loss(self, ctx):
            return LossOutput(ctx.logps().sum())

    with registered(TwoTeachers):
        result = estimate(load_recipe({
            "method": "test-two-logits", "model": {"name_or_path": mistral_dir, "lora": {"r": 8}},
            "teachers": {"dpo": {"adapter": mistral_dir}, "rev": {"adapter": mistral_dir}},
            "data": {"train": {"path": "recipes/data/quickstart_prefs.jsonl"}},
            "training": {"max_length": 1024, "per_device_train_batch_size": 1},
        }))  # fmt: skip
    lines = {line.name: line.bytes for line in result.lines}
    tokens = 2 * 1024  # K = 2 sequences of max_length
    assert lines["policy scored logits"] == tokens * 32000 * 12
    assert lines["teacher dpo scored logits"] == lines["teacher rev scored logits"] == tokens * 32000 * 4
