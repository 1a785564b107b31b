"""Model loading shared by every method: aliases and GGUF files resolved, dtype, 4-bit QLoRA, (layer-targeted)
LoRA configs, tokenizers with a pad token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import LoraSpec, ModelSpec, QuantizationSpec
from ..errors import TrlPlusError
from ..registry import get_registry
from .cache import cache_dir, gguf_checkpoint


def resolve_model_path(name_or_path: str, gguf_file: str | None = None, key: str = "model") -> str:
    """A registered alias becomes its local directory, a GGUF file its converted checkpoint (see
    :func:`gguf_checkpoint`); anything else is returned unchanged."""
    alias = get_registry().aliases.get(name_or_path)
    path = alias.build(cache_dir()) if alias else name_or_path
    if gguf_file is None:
        return path
    gguf = Path(gguf_file).expanduser()
    if not gguf.is_absolute() and not gguf.exists():
        gguf = Path(path).expanduser() / gguf_file
    if not gguf.is_file():
        raise TrlPlusError(
            f"{key}.gguf_file: no such file: {gguf} (give a file name inside {key}.name_or_path, or a path to the file;"
            " hub downloads of GGUF files are not supported)"
        )
    return gguf_checkpoint(gguf)


def _torch_dtype(name: str | None):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def bnb_config(spec: QuantizationSpec):
    """transformers' ``BitsAndBytesConfig`` for a recipe's ``quantization`` block (NF4, double quantisation)."""
    from transformers import BitsAndBytesConfig

    if not spec.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=_torch_dtype(spec.compute_dtype),
    )


def lora_config(spec: LoraSpec):
    """peft ``LoraConfig``; ``spec.layers`` becomes ``layers_to_transform`` (SAIL layer-targeted LoRA)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        layers_to_transform=spec.layers,
        modules_to_save=spec.modules_to_save,
        task_type="CAUSAL_LM",
    )


def load_tokenizer(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None
):
    """The tokenizer of a model (alias, directory, hub name or GGUF file), with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TrlPlusError(f"model.name_or_path: cannot load a tokenizer from {name_or_path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: ModelSpec | Any,
    *,
    trainable: bool = True,
    key: str = "model",
    gradient_checkpointing: bool = True,
):
    """Load a causal LM as the recipe describes.

    ``trainable=False`` loads a frozen copy (reference or teacher): no LoRA, eval mode, no grads. With
    quantization the base weights are 4-bit NF4 and, for training, prepared with peft's
    ``prepare_model_for_kbit_training``. LoRA itself is applied by the trainer (``peft_config``) so that TRL's
    QLoRA handling (bf16 adapters, adapter-off reference) applies.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec.name_or_path, getattr(spec, "gguf_file", None), key)
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        raise TrlPlusError(
            f"{key}.name_or_path: {spec.name_or_path} holds a LoRA adapter, not a model; merge it into its base "
            f"first with `trl-plus merge {spec.name_or_path}` and use {spec.name_or_path}-merged"
        )
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(spec.dtype) or "auto"}
    for name in ("revision", "trust_remote_code", "attn_implementation"):
        if getattr(spec, name, None) is not None:
            kwargs[name] = getattr(spec, name)
    quantization = getattr(spec, "quantization", None)
    if quantization is not None and quantization.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quantization)
        kwargs["device_map"] = {"": _device_index()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise TrlPlusError(f"{key}.name_or_path: cannot load model {spec.name_or_path!r}: {exc}") from exc
    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return model
    if quantization is not None and quantization.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    quantized = quantization is not None and quantization.load_in_4bit
    if not torch.cuda.is_available() and spec.dtype == "auto" and model.dtype == torch.bfloat16 and not quantized:
        model = model.float()  # CPU: bf16 weights train slowly and imprecisely; use float32
    return model


def _device_index():
    import torch

    if torch.cuda.is_available():
        from accelerate import PartialState

        return PartialState().local_process_index
    return "cpu"


def bf16_available() -> bool:
    """Whether training here can use bf16: a CUDA GPU that supports it (``trl.DPOConfig``'s default, ``bf16=True``,
    fails on a CPU)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
