"""YAML recipes: the user-facing description of a run, validated completely before any model is loaded.

Precedence: the method's defaults < the YAML file < ``--set key.path=value`` overrides. Every error names the
file, the key path and the expected type or choices (with the nearest key for a typo).
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, ValidationError

from .errors import TrlPlusError, did_you_mean

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantizationSpec(_Block):
    """4-bit QLoRA loading through bitsandbytes."""

    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"


class LoraSpec(_Block):
    """LoRA adapters; ``layers`` restricts them to those decoder layers (SAIL-style layer-targeted LoRA)."""

    r: PositiveInt = 16
    alpha: float = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None


class ModelSpec(_Block):
    """The policy: a hub name, a local directory, or a registered alias (``trl-plus list`` shows them).

    ``gguf_file`` loads a GGUF file (a name inside ``name_or_path``, or a path to the file): it is dequantised once
    into a plain trainable checkpoint, cached by the file's hash (``$TRL_PLUS_CACHE/gguf``) and reused.
    """

    name_or_path: str
    gguf_file: str | None = None
    dtype: Dtype = "auto"
    quantization: QuantizationSpec | None = None
    lora: LoraSpec | None = None
    gradient_checkpointing: bool | None = None  # None: TRL's default (on)
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None


class ReferenceSpec(_Block):
    """Where reference log-probs come from (``auto`` picks adapter-off for LoRA, else a frozen copy)."""

    mode: Literal["auto", "model", "adapter", "precomputed", "none"] = "auto"
    name_or_path: str | None = None  # a different reference model (default: the policy's starting weights)
    gguf_file: str | None = None  # with name_or_path: a GGUF reference (see ModelSpec)
    dtype: Dtype | None = None


class TeacherSpec(_Block):
    """A frozen teacher model for methods that need one."""

    name_or_path: str
    gguf_file: str | None = None
    dtype: Dtype = "auto"
    quantization: QuantizationSpec | None = None


class DataSource(_Block):
    """One data file or hub dataset. ``columns`` maps the method's column names to the file's, e.g.
    ``{completion: chosen}`` trains ``sft`` on the chosen answers of a preference file."""

    path: str
    split: str = "train"
    limit: PositiveInt | None = None
    columns: dict[str, str] = Field(default_factory=dict)


class DataSpec(_Block):
    """Training pairs and, optionally, held-out pairs: ``eval`` feeds TRL's evaluation loop (``eval_steps``) and,
    with ``report: true``, the before/after table ``trl-plus train`` prints (see ``trl_plus.evaluate``)."""

    train: DataSource
    eval: DataSource | None = None
    report: bool = True


class Recipe(_Block):
    """A whole run. ``training`` takes any ``trl.DPOConfig`` field except the loss fields the method owns."""

    method: str
    method_args: dict[str, Any] = Field(default_factory=dict)
    model: ModelSpec
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec)
    teacher: TeacherSpec | None = None
    data: DataSpec
    training: dict[str, Any] = Field(default_factory=dict)


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


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic block class found by walking ``loc`` down from :class:`Recipe`."""
    model: Any = Recipe
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = [a for a in typing.get_args(annotation) if isinstance(a, type)] or [annotation]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def explain(error: ValidationError, source: str, prefix: tuple = (), model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``file: key.path: what is wrong``."""
    lines = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union["))))
        key = _format_loc(prefix + loc)
        if err["type"] == "extra_forbidden":
            parent = model if model is not None and len(loc) == 1 else _model_at(loc[:-1])
            hint = did_you_mean(str(loc[-1]), parent.model_fields) if parent else ""
            lines.append(f"{source}: {key}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
        else:
            lines.append(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(dict.fromkeys(lines))


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


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value parsed as YAML, so numbers and booleans keep their type)."""
    if "=" not in item:
        raise TrlPlusError(f"--set {item}: expected key.path=value, e.g. --set training.max_steps=10")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in the nested ``data`` dict (creating blocks as needed)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise TrlPlusError(f"--set {item}: {part} is not a block")
            node = node[part]
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file with a safe loader; a clear error when it is missing or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise TrlPlusError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise TrlPlusError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise TrlPlusError(f"{path}: a recipe must be a mapping with keys method, model, data, ...")
    return data


def load_recipe(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Read (a file or a dict), apply ``--set`` overrides and validate the recipe's structure and types.

    The method name, its ``method_args`` and the ``training`` block are checked by :func:`check_recipe`.
    """
    name = "<recipe>" if isinstance(source, dict) else str(source)
    data = dict(source) if isinstance(source, dict) else read_yaml(source)
    data = apply_overrides(data, overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise TrlPlusError(explain(exc, name)) from None
    recipe._source = name
    return recipe


def recipe_source(recipe: Recipe) -> str:
    """The file a recipe came from (for error messages)."""
    return getattr(recipe, "_source", "<recipe>")


def check_recipe(recipe: Recipe):
    """Validate what depends on installed code: the method and its args, the training block, local paths.

    Returns ``(method_instance, training_kwargs)``.
    """
    from .data import looks_local
    from .registry import get_registry

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
    if recipe.reference.mode == "adapter" and recipe.model.lora is None:
        raise TrlPlusError(f"{source}: reference.mode: 'adapter' needs model.lora; use 'model' or 'auto'")
    if method.needs.reference == "no" and recipe.reference.mode not in ("auto", "none"):
        raise TrlPlusError(f"{source}: reference.mode: method {method.name!r} is reference-free; use auto or none")
    if method.needs.reference == "yes" and recipe.reference.mode == "none":
        raise TrlPlusError(f"{source}: reference.mode: method {method.name!r} needs a reference; use auto")
    return method, training
