"""``trl-plus generate RUN_DIR --prompt ...``: a finished run's policy (its adapter or adapters, the modules its
method added) loaded back and sampled from, greedily by default; ``--weights`` goes to the method
(:meth:`~trl_plus.Method.generation_model`: MAH-DPO mixes its heads, OFS-DPO combines its adapters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import load_recipe
from ..errors import TrlPlusError
from ..models.load import load_model, load_tokenizer
from ..registry import get_registry
from .rundir import RESOLVED_RECIPE


def load_run(run_dir: str | Path) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, method)`` of a finished run: the base of its ``model`` block, the method's
    :meth:`~trl_plus.Method.prepare_model` applied, then the run's weights: its LoRA adapter (``model.lora``), every
    named adapter (``model.adapters``, the first one active) or, for a full fine-tuning run, its saved model (with
    the modules the method added read from its weight files)."""
    run_dir = Path(run_dir)
    if not (run_dir / RESOLVED_RECIPE).is_file():
        raise TrlPlusError(f"{run_dir}: no {RESOLVED_RECIPE}; give the output_dir of a finished trl-plus train run")
    recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    method = get_registry().get(recipe.method)(recipe.method_args)
    spec = recipe.model
    names = list(spec.adapters or ())
    if not spec.uses_lora:  # a full fine-tuning run: its own folder holds the model
        spec = spec.model_copy(update={"name_or_path": str(run_dir), "gguf_file": None})
    base = load_model(spec.model_copy(update={"lora": None, "adapters": None}), trainable=False)
    known = set(base.state_dict())
    model = method.prepare_model(base) or base
    added = [key for key in model.state_dict() if key not in known]
    if added and not spec.uses_lora:
        _load_keys(model, run_dir, added)
    if spec.lora is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run_dir))
    elif names:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run_dir / names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(run_dir / name), adapter_name=name)
        model.set_adapter(names[0])
    return model.eval(), load_tokenizer(str(run_dir)), method


def _load_keys(model: Any, run_dir: Path, keys: list[str]) -> None:
    """Weights ``keys`` of ``model`` from the run's ``*.safetensors`` files (what ``from_pretrained`` left out:
    modules the method added)."""
    from safetensors import safe_open

    found = {}
    for path in sorted(run_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            found.update({key: weights.get_tensor(key) for key in keys if key in weights.keys()})
    missing = [key for key in keys if key not in found]
    if missing:
        raise TrlPlusError(f"{run_dir}: the run's weights hold no {missing[0]} (a module its method adds)")
    model.load_state_dict(found, strict=False)


def generate(run_dir: str | Path, prompts: list[str], weights: list[float] | None = None, max_new_tokens: int = 64,
             adapter: str | None = None, sample: bool = False, scorers: tuple = ()) -> list[str]:  # fmt: skip
    """The completions of ``prompts`` by the run's policy (greedy unless ``sample``); ``adapter`` picks one of
    several named adapters; ``weights`` go to the method's :meth:`~trl_plus.Method.generation_model`; ``scorers``
    (to score the completions with afterwards) get the run's tokenizer."""
    import torch

    model, tokenizer, method = load_run(run_dir)
    for scorer in scorers:
        scorer.tokenizer = scorer.tokenizer or tokenizer
    if adapter is not None:
        if adapter not in getattr(model, "peft_config", {}):
            raise TrlPlusError(f"--adapter: the run has no adapter named {adapter!r} (it has: "
                               f"{', '.join(getattr(model, 'peft_config', {})) or 'none'})")  # fmt: skip
        model.set_adapter(adapter)
    chosen = method.generation_model(model, weights)
    if chosen is None:
        if weights is not None:
            raise TrlPlusError(f"--weights: method {method.name!r} has nothing to mix at inference")
        chosen = model
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(chosen.device)
        with torch.no_grad():
            tokens = chosen.generate(**ids, max_new_tokens=max_new_tokens, do_sample=sample,
                                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        outputs.append(tokenizer.decode(tokens[0, ids["input_ids"].size(1) :], skip_special_tokens=True))
    return outputs
