"""What ``trl-plus validate`` checks beyond the schema, before any model loads: the method and its ``method_args``,
the ``training`` block against ``trl.DPOConfig``, model and data paths, the reference mode and the data's columns.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..config import Recipe, explain, recipe_source
from ..data.load import check_columns, load_preferences, looks_local
from ..errors import TrlPlusError, did_you_mean
from ..registry import get_registry
from ..trainers import check_trainer_kind
from ..trainers.frozen import resolve_reference_mode

# DPOConfig fields that the method, the reference block or the model block own.
OWNED_TRAINING_KEYS = {
    "beta": "method_args.beta",
    "loss_type": "method (choose another method or method_args)",
    "loss_weights": "method / method_args",
    "label_smoothing": "method_args.label_smoothing",
    "ld_alpha": "method: ld-dpo (method_args.alpha)",
    "f_divergence_type": "method / method_args",
    "f_alpha_divergence_coef": "method / method_args",
    "use_weighting": "method / method_args",
    "discopop_tau": "method / method_args",
    "precompute_ref_log_probs": "reference.mode: precomputed",
    "model_init_kwargs": "the model: block",
}



def _training_field_types() -> dict[str, Any]:
    from trl import DPOConfig

    try:
        return typing.get_type_hints(DPOConfig)
    except Exception:  # an annotation that cannot be resolved: fall back to names only
        return {f: Any for f in DPOConfig.__dataclass_fields__}


def validate_training(training: dict[str, Any], source: str) -> dict[str, Any]:
    """Check the ``training`` block against ``trl.DPOConfig`` (names and types); return it with coerced values."""
    import dataclasses

    from trl import DPOConfig

    fields = {f.name: f for f in dataclasses.fields(DPOConfig) if f.init}
    types = _training_field_types()
    out = {}
    for key, value in training.items():
        if key in OWNED_TRAINING_KEYS:
            raise TrlPlusError(f"{source}: training.{key}: set by trl-plus; use {OWNED_TRAINING_KEYS[key]} instead")
        if key not in fields:
            raise TrlPlusError(f"{source}: training.{key}: unknown key{did_you_mean(key, fields)}")
        annotation = types.get(key, Any)
        try:
            out[key] = TypeAdapter(annotation).validate_python(value)
        except ValidationError as exc:
            expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            hint = " (YAML reads no/yes/off/on as booleans: quote the word, e.g. 'no')" if isinstance(value, bool) else ""
            raise TrlPlusError(
                f"{source}: training.{key}: expected {expected}, got {value!r} ({exc.errors()[0]['msg']}){hint}"
            ) from None
        except Exception:  # annotation pydantic cannot check (an enum union, a class): TRL will check it
            out[key] = value
    return out


def check_recipe(recipe: Recipe):
    """Validate what depends on installed code: the method and its args, the training block, local paths.

    Returns ``(method_instance, training_kwargs)``.
    """
    source = recipe_source(recipe)
    registry = get_registry()
    try:
        method_cls = registry.get(recipe.method)
    except TrlPlusError as exc:
        raise TrlPlusError(f"{source}: method: {exc}") from None
    try:
        method = method_cls(method_cls.Config(**recipe.method_args))
    except ValidationError as exc:
        raise TrlPlusError(explain(exc, source, prefix=("method_args",), model=method_cls.Config)) from None
    try:
        check_trainer_kind(method)
    except TrlPlusError as exc:
        raise TrlPlusError(f"{source}: method: {exc}") from None
    training = validate_training(recipe.training, source)

    model_paths = [("model.name_or_path", recipe.model.name_or_path)]
    if recipe.reference.name_or_path:
        model_paths.append(("reference.name_or_path", recipe.reference.name_or_path))
    if recipe.teacher:
        model_paths.append(("teacher.name_or_path", recipe.teacher.name_or_path))
    for key, path in model_paths:
        if path not in registry.aliases and looks_local(path) and not Path(path).expanduser().is_dir():
            raise TrlPlusError(
                f"{source}: {key}: no such model directory: {path} "
                f"(use a local directory, a hub name, or an alias: {', '.join(registry.aliases)})"
            )
    for key, spec in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if spec is not None and looks_local(spec.path) and not Path(spec.path).expanduser().exists():
            raise TrlPlusError(f"{source}: {key}.path: no such file: {spec.path}")
    if method.needs.teacher and recipe.teacher is None:
        raise TrlPlusError(f"{source}: teacher: method {method.name!r} needs a teacher model (teacher.name_or_path)")
    try:  # the one copy of the reference-mode rules (the trainer applies the same function)
        resolve_reference_mode(method, recipe.reference.mode, is_peft=recipe.model.lora is not None,
                               has_ref_model=False)  # fmt: skip
    except TrlPlusError as exc:
        raise TrlPlusError(f"{source}: {exc}") from None
    return method, training


def load_split(recipe: Recipe, method, which: str):
    """The recipe's ``data.<which>`` split (``train`` or ``eval``) as a dataset whose columns ``method`` can read,
    or ``None`` when the recipe has no such split."""
    spec = getattr(recipe.data, which)
    if spec is None:
        return None
    where = f"{recipe_source(recipe)}: data.{which}"
    dataset = load_preferences(spec.path, spec.split, spec.limit, where=where, columns=spec.columns)
    check_columns(dataset.column_names, method, f"{recipe_source(recipe)}: data.{which} ({spec.path})")
    return dataset
