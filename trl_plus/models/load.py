"""Model loading shared by every method: aliases and GGUF files resolved, dtype, 4-bit QLoRA, (layer-targeted)
LoRA configs, tokenizers with a pad token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import LoraSpec, ModelSpec, QuantizationSpec
from ..errors import TrlPlusError, did_you_mean
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


def peft_configs(spec: ModelSpec) -> tuple[Any, dict[str, float] | None]:
    """The policy's peft config(s) from ``model.lora`` (one ``LoraConfig``) or ``model.adapters`` (name ->
    ``LoraConfig``, in the recipe's order) and, for the latter, each adapter's ``lr_scale``; ``(None, None)``
    without LoRA."""
    if spec.adapters:
        return ({name: lora_config(a) for name, a in spec.adapters.items()},
                {name: a.lr_scale for name, a in spec.adapters.items()})  # fmt: skip
    return (lora_config(spec.lora) if spec.lora else None), None


def load_tokenizer(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None,
    local_files_only: bool = False,
):  # fmt: skip
    """The tokenizer of a model (alias, directory, hub name or GGUF file), with a pad token (EOS if it has none).
    ``local_files_only``: never reach the hub (a hub name must be in the local cache), so it fails at once offline."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_files_only)  # fmt: skip
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
    ``prepare_model_for_kbit_training`` (``quantization.upcast: false``: the same without its float32 cast of the
    unquantised weights). LoRA itself is applied by the trainer (``peft_config``) so that TRL's
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
    if quantization is not None and quantization.load_in_4bit and quantization.upcast:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif quantization is not None and quantization.load_in_4bit:  # peft's preparation without the float32 cast
        model.requires_grad_(False)
        if gradient_checkpointing:
            model.enable_input_require_grads()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
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


def check_lora_targets(spec: ModelSpec, path: str, key: str = "model") -> None:
    """Check ``spec.lora`` against the model's modules before any weight loads: the model is built from its config on
    the meta device (no memory), so a mistyped ``target_modules`` name or a ``layers`` index the model lacks is one
    line naming the modules it has, not a peft traceback after loading. Skipped unless ``path`` is a local folder."""
    blocks = {f"{key}.lora": spec.lora} if spec.lora else {f"{key}.adapters.{n}": a for n, a in (spec.adapters or {}).items()}
    if not blocks or not (Path(path) / "config.json").is_file():
        return
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    layers = getattr(config, "num_hidden_layers", None)
    for where, lora in blocks.items():
        targets = lora.target_modules
        if isinstance(targets, str) and targets != "all-linear":
            if not any(re.fullmatch(targets, name) for name in names):
                raise TrlPlusError(f"{where}.target_modules: the pattern {targets!r} matches no module of "
                                   f"{spec.name_or_path} (its linear layers: {', '.join(linear)})")  # fmt: skip
        elif isinstance(targets, list):
            missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
            if missing:
                raise TrlPlusError(f"{where}.target_modules: {spec.name_or_path} has no module named "
                                   f"{', '.join(missing)}{did_you_mean(missing[0], linear)} (its linear layers: "
                                   f"{', '.join(linear)})")  # fmt: skip
        if lora.layers and layers is not None and not all(0 <= i < layers for i in lora.layers):
            raise TrlPlusError(f"{where}.layers: {spec.name_or_path} has {layers} decoder layers (0 to "
                               f"{layers - 1}); got {lora.layers}")  # fmt: skip


def bf16_available() -> bool:
    """Whether training here can use bf16: a CUDA GPU that supports it (``trl.DPOConfig``'s default, ``bf16=True``,
    fails on a CPU)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def frozen_model(path: str, device: Any = None) -> Any:
    """A frozen causal LM for a group method's own use (e.g. a token-reward source): a model folder, hub id or model
    alias (``tiny-llama``), or a LoRA adapter folder on its base (``base_model_name_or_path``; ``with
    model.disable_adapter():`` is then the base); eval mode, no grad, on ``device``. For a group method's
    :func:`~trl_plus.rollout_token_logps` it must share the policy's tokenizer (it is fed the policy's token ids)."""
    from transformers import AutoModelForCausalLM

    from ..builtin.scorers import adapter_model

    if (Path(path) / "adapter_config.json").is_file():
        model = adapter_model(path, device=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path)).eval()
        if device is not None:
            model.to(device)
    return model.requires_grad_(False)
