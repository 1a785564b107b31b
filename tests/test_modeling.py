"""Model loading shared by all methods: 4-bit QLoRA and SAIL-style layer-targeted LoRA, on the CPU."""

from __future__ import annotations

import math

import pytest
from safetensors import safe_open

import trl_plus
import trl_plus.run.rundir
import trl_plus.run.train
from trl_plus.config import ModelSpec, QuantizationSpec
from trl_plus.models.load import load_model

QLORA = {
    "method": "dpo",
    "model": {
        "name_or_path": "tiny-llama",
        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "layers": [1]},
    },
    "data": {"train": {"path": "recipes/data/quickstart_prefs.jsonl", "limit": 32}},
    "training": {"max_steps": 3, "learning_rate": 5e-3, "per_device_train_batch_size": 4, "logging_steps": 1,
                 "activation_checkpointing": True, "save_strategy": "no", "disable_tqdm": True},  # fmt: skip
}


def test_4bit_base_weights():
    import bitsandbytes as bnb

    model = load_model(ModelSpec(name_or_path="tiny-llama", quantization=QuantizationSpec(compute_dtype="float32")))
    assert model.is_loaded_in_4bit
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quant


def test_qlora_with_layer_targeted_lora_trains_and_saves_only_those_layers(tmp_path):
    import bitsandbytes as bnb

    result = trl_plus.train(QLORA, [f"training.output_dir={tmp_path}"])
    assert result.global_step == 3
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert all(".layers.1." in k for k in keys), keys  # only the chosen layer
    assert any("q_proj" in k for k in keys) and any("v_proj" in k for k in keys)
    assert all(("q_proj" in k) or ("v_proj" in k) for k in keys)
    # the reference is the adapter switched off: the first loss is exactly log 2
    state = trl_plus.run.rundir.read_state(tmp_path)
    assert state["log_history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # the trained base weights are still 4-bit
    trainer = trl_plus.run.train.build_trainer(trl_plus.load_recipe(QLORA, [f"training.output_dir={tmp_path}/b"]))
    base = trainer.model.get_base_model()
    assert isinstance(base.model.layers[1].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert not hasattr(base.model.layers[0].self_attn.q_proj, "lora_A")


def test_a_separate_reference_model_from_the_recipe(tmp_path):
    from trl_plus.models.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other-reference", seed=7)
    recipe = {
        "method": "dpo",
        "model": {"name_or_path": "tiny-llama"},
        "reference": {"mode": "model", "name_or_path": other},
        "data": {"train": {"path": "recipes/data/quickstart_prefs.jsonl", "limit": 8}},
        "training": {"output_dir": str(tmp_path / "out"), "activation_checkpointing": False},
    }
    trainer = trl_plus.run.train.build_trainer(trl_plus.load_recipe(recipe))
    assert trainer.reference_mode == "model"
    ref_weight = trainer.ref_model.model.embed_tokens.weight
    assert not ref_weight.requires_grad
    assert not (ref_weight == trainer.model.model.embed_tokens.weight).all()  # the other model, not a copy
    import torch

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        assert abs(trainer.compute_loss(trainer.model, batch).item() - math.log(2)) > 1e-3


def test_build_once_heals_a_half_copy_and_waits_for_the_process_that_writes_the_model(tmp_path):
    """Once torch.distributed is up transformers writes model files on rank 0 only: another rank's build writes the
    tokenizer alone, and must neither install that half copy nor keep one an older version left."""
    import threading

    from trl_plus.models.cache import build_once

    def full(d):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "tokenizer.json").write_text("{}")

    def tokenizer_only(d):
        d.mkdir()
        (d / "tokenizer.json").write_text("{}")

    half = tmp_path / "half"
    tokenizer_only(half)
    assert build_once(half, full) == str(half) and (half / "config.json").exists()

    target = tmp_path / "waits"
    writer = threading.Timer(0.6, lambda: full(target))
    writer.start()
    assert build_once(target, tokenizer_only) == str(target) and (target / "config.json").exists()
    writer.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "waits"]  # no temporary folder left
