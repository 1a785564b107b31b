"""What ``trl-plus validate`` checks beyond the schema, before any model loads: the method and its ``method_args``,
the ``training`` block against ``trl.DPOConfig``, model and data paths, the reference mode and the data's columns.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..config import IterationsSpec, PhaseSpec, Recipe, explain, is_overridden, locate, recipe_source
from ..contract import check_decoding
from ..data.lengths import dropped_message, fully_truncated, truncation_report
from ..data.load import (
    check_columns,
    check_lists,
    check_rows,
    check_text_columns,
    few_rows,
    load_preferences,
    looks_local,
    message_columns,
    prepare_rows,
    quiet_progress,
)
from ..data.tokenize import tokenize_pair
from ..errors import TrlPlusError, did_you_mean
from ..models.cache import gguf_problem
from ..models.load import load_tokenizer
from ..registry import get_registry
from ..trainers import check_trainer_kind
from ..trainers.frozen import HIDDEN_KINDS, resolve_reference_mode
from ..trainers.guard import NAN_POLICIES
from .rundir import check_run_owner

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

#: ``training`` keys of trl-plus's own, not ``trl.DPOConfig`` fields: checked by :func:`check_recipe`, never passed
#: to ``DPOConfig``.
RUN_TRAINING_KEYS = ("resume_from_checkpoint", "nan", "overwrite_output_dir", "prefix_sharing", "packing")

# Deprecated DPOConfig names a recipe may still use: read as the current transformers names (no FutureWarning).
RENAMED_TRAINING_KEYS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


#: Counts and rates that must be positive (TRL would accept them and train something else, or nothing).
POSITIVE_TRAINING_KEYS = (
    "learning_rate", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "max_length", "logging_steps", "save_steps", "eval_steps",
)  # fmt: skip
#: Those that may also be zero.
NON_NEGATIVE_TRAINING_KEYS = ("warmup_steps", "weight_decay", "max_grad_norm", "save_total_limit")


#: ``training.report_to`` integrations -> (the modules any one of which makes transformers' callback work, the
#: package to install, how).
REPORT_TO_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboardX", 'pip install "trl-plus[tensorboard]"'),
    "wandb": (("wandb",), "wandb", "pip install wandb"),
    "trackio": (("trackio",), "trackio", "pip install trackio"),
    "mlflow": (("mlflow",), "mlflow", "pip install mlflow"),
    "comet_ml": (("comet_ml",), "comet-ml", "pip install comet-ml"),
}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_report_to(report_to: Any, where: Callable[[str], str]) -> None:
    """Each integration ``training.report_to`` names has its package installed (transformers would fail only
    after the models load); ``"all"`` and ``"none"`` name nothing to check."""
    for name in [report_to] if isinstance(report_to, str) else list(report_to or ()):
        if name not in REPORT_TO_PACKAGES:
            continue  # "all", "none", or an integration transformers checks itself
        modules, package, install = REPORT_TO_PACKAGES[name]
        if not any(_installed(m) for m in modules):
            raise TrlPlusError(f"{where('training.report_to')}: {name} needs the package {package}: {install}")


def training_field_names() -> set[str]:
    """The ``__init__`` fields of ``trl.DPOConfig`` (with those of its ``TrainingArguments`` bases), read from their
    source files without importing TRL (which imports torch: seconds), so a mistyped key is reported at once."""
    import ast
    import importlib.util

    names: set[str] = set()
    for module, cls in (("trl.trainer.dpo_config", "DPOConfig"), ("trl.trainer.base_config", "_BaseConfig"),
                        ("transformers.training_args", "TrainingArguments")):  # fmt: skip
        spec = importlib.util.find_spec(module)
        tree = ast.parse(Path(spec.origin).read_text())
        body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                call = node.value
                no_init = isinstance(call, ast.Call) and any(
                    k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in call.keywords
                )
                if not no_init and not node.target.id.startswith("_"):
                    names.add(node.target.id)
    return names


def _training_field_types(config_cls: type | None = None) -> dict[str, Any]:
    if config_cls is None:
        from trl import DPOConfig as config_cls
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # an annotation that cannot be resolved: fall back to names only
        return {f: Any for f in config_cls.__dataclass_fields__}


def _check_range(key: str, value: Any, where: Callable[[str], str]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if key == "max_steps" and (value == 0 or value < -1):
        raise TrlPlusError(f"{where('training.max_steps')}: {value} is not a step count; give a positive number, or -1 "
                           "to train for num_train_epochs")  # fmt: skip
    if key in POSITIVE_TRAINING_KEYS and value <= 0:
        raise TrlPlusError(f"{where('training.' + key)}: must be positive, got {value}")
    if key in NON_NEGATIVE_TRAINING_KEYS and value < 0:
        raise TrlPlusError(f"{where('training.' + key)}: must be zero or more, got {value}")


def validate_training(training: dict[str, Any], where: str | Callable[[str], str],
                      config_cls: type | None = None, owned: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Check the ``training`` block against ``trl.DPOConfig`` (or another ``TrainingArguments`` dataclass,
    ``config_cls``: a diffusion run's ``DiffusionConfig``): names first (without importing TRL), then types and
    the ranges of counts and rates; return it with coerced values, the deprecated names of
    :data:`RENAMED_TRAINING_KEYS` under their current ones. ``where(key)`` says where an error points (a file name
    ``f`` stands for ``f: key``)."""
    if isinstance(where, str):
        source = where

        def where(key: str) -> str:
            return f"{source}: {key}"

    import dataclasses

    try:
        if config_cls is not None:
            fields = {f.name for f in dataclasses.fields(config_cls) if f.init and not f.name.startswith("_")}
        else:
            fields = training_field_names()
    except Exception:  # TRL's source moved: ask the class itself (slower)
        from trl import DPOConfig

        fields = {f.name for f in dataclasses.fields(DPOConfig) if f.init}
    owned = OWNED_TRAINING_KEYS if owned is None else owned
    for key in training:
        if key in owned:
            raise TrlPlusError(f"{where('training.' + key)}: set by trl-plus; use {owned[key]} instead")
        if key not in fields:
            raise TrlPlusError(f"{where('training.' + key)}: unknown key{did_you_mean(key, fields)}")
        name = RENAMED_TRAINING_KEYS.get(key, key)
        if name != key and name in training:
            raise TrlPlusError(f"{where('training.' + key)}: the deprecated name of {name}; set only {name}")
    types = _training_field_types(config_cls) if training else {}
    out = {}
    for key, value in training.items():
        name = RENAMED_TRAINING_KEYS.get(key, key)
        annotation = types.get(key, Any)
        try:
            out[name] = TypeAdapter(annotation).validate_python(value)
        except ValidationError as exc:
            expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            hint = " (YAML reads no/yes/off/on as booleans: quote the word, e.g. 'no')" if isinstance(value, bool) else ""
            raise TrlPlusError(
                f"{where('training.' + key)}: expected {expected}, got {value!r} ({exc.errors()[0]['msg']}){hint}"
            ) from None
        except Exception:  # annotation pydantic cannot check (an enum union, a class): TRL will check it
            out[name] = value
        _check_range(key, out[name], where)
    return out


def training_schema(method) -> tuple[type | None, dict[str, str] | None]:
    """``(config class, owned keys)`` a method's ``training`` block is checked against: ``trl.DPOConfig`` and
    :data:`OWNED_TRAINING_KEYS` (``(None, None)``), a diffusion run's ``DiffusionConfig``, or a group method's
    ``trl.GRPOConfig`` and the keys its rollout and scorers own."""
    if method.trainer == "diffusion":
        from ..diffusion.trainer import DiffusionConfig

        return DiffusionConfig, None
    if method.trainer == "group":
        from trl import GRPOConfig

        from ..trainers.group import OWNED_GROUP_KEYS

        return GRPOConfig, OWNED_GROUP_KEYS
    return None, None


def check_recipe(recipe: Recipe):
    """Validate what depends on installed code: the method and its args, the training block, local paths.

    Returns ``(method_instance, training_kwargs)``.
    """
    source = recipe_source(recipe)
    registry = get_registry()
    try:
        method_cls = registry.get(recipe.method)
    except TrlPlusError as exc:
        raise TrlPlusError(f"{locate(recipe, 'method')}: {exc}") from None
    try:
        method = method_cls(method_cls.Config(**recipe.method_args))
    except ValidationError as exc:
        raise TrlPlusError(explain(exc, source, prefix=("method_args",), model=method_cls.Config,
                                   overridden=recipe._overridden)) from None  # fmt: skip
    try:
        check_trainer_kind(method)
    except TrlPlusError as exc:
        raise TrlPlusError(f"{source}: method: {exc}") from None
    check_model_kind(recipe, method)
    build_metrics(recipe, method)
    build_rollout(recipe, method)
    plan_iterations(recipe, method)
    if recipe.phases is not None:
        check_phases(recipe)
    training = {k: v for k, v in recipe.training.items() if k not in RUN_TRAINING_KEYS}
    training = validate_training(training, lambda key: locate(recipe, key), *training_schema(method))
    check_report_to(training.get("report_to"), lambda key: locate(recipe, key))
    resume = recipe.training.get("resume_from_checkpoint")  # true (the latest checkpoint) or a folder
    if not isinstance(resume, (bool, str, type(None))):
        raise TrlPlusError(f"{source}: training.resume_from_checkpoint: expected true or a checkpoint folder, "
                           f"got {resume!r}")  # fmt: skip
    if recipe.training.get("nan", "stop") not in NAN_POLICIES:
        raise TrlPlusError(f"{locate(recipe, 'training.nan')}: expected stop (end the run at a non-finite loss or "
                           f"gradient norm) or skip (drop that batch), got {recipe.training['nan']!r}")  # fmt: skip
    for key in ("overwrite_output_dir", "prefix_sharing", "packing"):
        value = recipe.training.get(key, False)
        if not isinstance(value, bool):
            raise TrlPlusError(f"{locate(recipe, 'training.' + key)}: expected true or false, got {value!r}")
    if recipe.training.get("packing") and not recipe.training.get("prefix_sharing"):
        raise TrlPlusError(f"{locate(recipe, 'training.packing')}: packing packs prefix-shared blocks; set "
                           "training.prefix_sharing: true too")  # fmt: skip
    overwrite = recipe.training.get("overwrite_output_dir", False)
    if overwrite and resume not in (None, False):
        raise TrlPlusError(f"{source}: training.overwrite_output_dir: true deletes the checkpoints that "
                           "training.resume_from_checkpoint would resume from; set only one of them")  # fmt: skip

    model_paths = [("model.name_or_path", recipe.model.name_or_path)]
    if recipe.reference.name_or_path:
        model_paths.append(("reference.name_or_path", recipe.reference.name_or_path))
    teachers = {key: spec for key, _, spec in recipe.teacher_blocks()}
    model_paths += [(f"{key}.name_or_path", spec.name_or_path) for key, spec in teachers.items() if spec.name_or_path]
    if recipe.model.kind == "diffusion":
        check_diffusion_model(recipe, method, training)
        model_paths.pop(0)
    for key, path in model_paths:
        if path in registry.aliases or not looks_local(path):
            continue
        block = key.rsplit(".", 1)[0]
        spec = teachers[block] if block in teachers else getattr(recipe, block)
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise TrlPlusError(
                f"{locate(recipe, key)}: no such model directory: {path} (looked for {looked_for(recipe, key, path)}; "
                f"use a local directory, a hub name, or an alias: {', '.join(registry.aliases)})"
            )
        gguf = getattr(spec, "gguf_file", None)
        if gguf is None and not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise TrlPlusError(f"{locate(recipe, key)}: {folder.resolve()} has no config.json, so it is not a "
                               "transformers model folder: give the folder save_pretrained wrote (or set "
                               f"{block}.gguf_file for a GGUF file in it)")  # fmt: skip
    check_teacher_blocks(recipe, method, teachers)
    check_policy_adapters(recipe, method)
    for key, spec in (("model", recipe.model), ("reference", recipe.reference), *teachers.items()):
        gguf = getattr(spec, "gguf_file", None) if spec is not None else None
        candidates = [Path(gguf).expanduser()] if gguf else []
        if gguf and getattr(spec, "name_or_path", None):
            candidates.append(Path(spec.name_or_path).expanduser() / gguf)
        found = next((c for c in candidates if c.is_file()), None)
        if found is not None and (problem := gguf_problem(found)):
            raise TrlPlusError(f"{locate(recipe, key + '.gguf_file')}: {problem}")
    sets = recipe.data.eval_sets()
    evals = [("data.eval" if isinstance(recipe.data.eval, type(recipe.data.train)) else f"data.eval.{name}", spec)
             for name, spec in sets.items()]  # fmt: skip
    for key, spec in (("data.train", recipe.data.train), *evals):
        if spec is not None and looks_local(spec.path) and not Path(spec.path).expanduser().exists():
            raise TrlPlusError(f"{locate(recipe, key + '.path')}: no such file: {spec.path} (looked for "
                               f"{looked_for(recipe, key + '.path', spec.path)}; a relative path in a recipe is read "
                               "from the recipe's folder, then from the working directory)")  # fmt: skip
    output_dir = training.get("output_dir", default_output_dir(method))
    try:
        if not overwrite:  # train clears the folder first (trl_plus.run.rundir.clear_run_dir)
            check_run_owner(output_dir, method.name, recipe.model)
        resume = resume_target(resume, output_dir)
        if resume is not None:  # a checkpoint folder inside another run's directory
            check_run_owner(Path(resume).parent, method.name, recipe.model, key="training.resume_from_checkpoint")
    except TrlPlusError as exc:
        raise TrlPlusError(f"{source}: {exc}") from None
    try:  # the one copy of the reference-mode rules (the trainer applies the same function)
        resolve_reference_mode(method, recipe.reference.mode, is_peft=recipe.model.uses_lora,
                               has_ref_model=False, iterated=recipe.iterations is not None)  # fmt: skip
    except TrlPlusError as exc:
        raise TrlPlusError(f"{source}: {exc}") from None
    return method, training


def build_metrics(recipe: Recipe, method=None, names: list[str] | None = None) -> list:
    """The recipe's ``metrics:`` (or the metrics ``names``, e.g. ``--metric a,b``) as :class:`~trl_plus.Metric`
    instances, each name and ``args`` checked (one line: the unknown name's nearest ones, the bad argument)."""
    registry = get_registry()
    specs = [(f"metrics.{i}", m.name, m.args) for i, m in enumerate(recipe.metrics)]
    if names is not None:
        specs = [(f"--metric {n}", *_named_metric(n, recipe)) for n in names]
    if specs and method is not None and method.trainer != "preference":
        raise TrlPlusError(f"{locate(recipe, 'metrics')}: metrics run on text preference runs; method "
                           f"{method.name!r} runs on the {method.trainer!r} trainer")  # fmt: skip
    metrics = []
    for key, name, args in specs:
        where = key if key.startswith("--") else locate(recipe, key + ".name")
        try:
            metric_cls = registry.get_metric(name)
        except TrlPlusError as exc:
            raise TrlPlusError(f"{where}: {exc}") from None
        beta = getattr(getattr(method, "config", None), "beta", None)
        if "beta" in metric_cls.Config.model_fields and "beta" not in args and isinstance(beta, (int, float)):
            args = {**args, "beta": beta}  # the implicit reward of the run's own β
        try:
            metrics.append(metric_cls(metric_cls.Config(**args)))
        except ValidationError as exc:
            raise TrlPlusError(explain(exc, key if key.startswith("--") else recipe_source(recipe),
                                       prefix=() if key.startswith("--") else (*key.split("."), "args"),
                                       model=metric_cls.Config)) from None  # fmt: skip
    return metrics


def phase_recipe(recipe: Recipe, phase: PhaseSpec, output_dir: str | Path | None = None) -> Recipe:
    """The recipe phase ``phase`` trains with: the run's, with the phase's method (its ``method_args`` alone when it
    names another method, merged over the run's otherwise), data (``data.train``; no held-out split), rollout (the
    phase's, else the run's when the phase's method samples) and ``training`` overrides."""
    method = phase.method or recipe.method
    args = dict(phase.method_args) if phase.method else {**recipe.method_args, **phase.method_args}
    data = recipe.data.model_copy(update={"train": phase.data or recipe.data.train, "eval": None})
    rollout = phase.rollout
    if rollout is None and recipe.rollout is not None:
        try:
            samples = get_registry().get(method).needs.rollout is not None
        except TrlPlusError:
            samples = False  # an unknown method: check_recipe names it
        rollout = recipe.rollout if samples else None
    training = {**recipe.training, **phase.training}
    if output_dir is not None:
        training["output_dir"] = str(output_dir)
    return recipe.model_copy(update={"method": method, "method_args": args, "data": data, "rollout": rollout,
                                     "training": training, "phases": None})  # fmt: skip


def check_phases(recipe: Recipe) -> None:
    """Each phase's recipe validates (one line naming the phase), and a run with phases has no stages or
    iterations of its own."""
    plan = recipe.phases
    if recipe.stages is not None or recipe.iterations is not None:
        raise TrlPlusError(f"{recipe._source}: phases: a run has phases, or stages / iterations, not both")
    root = Path(recipe.training.get("output_dir") or f"runs/{recipe.method}")
    for i, phase in enumerate(plan.sequence):
        try:  # (in its round-1 folder: the run's own folder belongs to the run's method)
            check_recipe(phase_recipe(recipe, phase, root / f"round-1-{phase.name}"))
        except TrlPlusError as exc:
            raise TrlPlusError(f"{recipe._source}: phases.sequence.{i} ({phase.name}): "
                               f"{str(exc).removeprefix(recipe._source + ': ')}") from None  # fmt: skip


def build_rollout(recipe: Recipe, method) -> tuple[Any, list] | None:
    """An online method's :class:`~trl_plus.Rollout` (the method's, with the recipe's ``rollout:`` fields) and its
    scorers ``[(Scorer, weight)]``, each checked in one line; ``None`` for an offline method (which may not have a
    ``rollout:`` block)."""
    base = method.needs.rollout
    spec = recipe.rollout
    if base is None:
        if spec is not None:
            raise TrlPlusError(f"{locate(recipe, 'rollout')}: method {method.name!r} trains on its data, it samples "
                               "nothing: remove the rollout: block")  # fmt: skip
        return None
    if spec is None or not spec.scorers:
        raise TrlPlusError(f"{locate(recipe, 'rollout')}: method {method.name!r} ranks its own samples: add "
                           "rollout: {scorers: [{name: NAME}]} (trl-plus list --scorers)")  # fmt: skip
    fields = {k: v for k, v in (("n", spec.n), ("sources", spec.sources), ("decoding", spec.decoding)) if v}
    if spec.missing_eos_penalty is not None:
        fields["missing_eos_penalty"] = spec.missing_eos_penalty
    when = spec.when or ("iteration" if recipe.iterations is not None else None)
    if when == "step" and recipe.iterations is not None:
        raise TrlPlusError(f"{locate(recipe, 'rollout.when')}: step samples before every step; an iterations: block "
                           "samples once per iteration: drop one of them")  # fmt: skip
    if when is not None:
        fields["when"] = when
    if spec.every is not None:
        fields["every"] = spec.every
    rollout = base.updated(fields)
    images = method.trainer == "diffusion"
    if images:
        from ..diffusion.sampling import check_sampling

        check_sampling(dict(rollout.decoding), where=locate(recipe, "rollout.decoding"))
        if tuple(rollout.sources) != ("policy",):
            raise TrlPlusError(f"{locate(recipe, 'rollout.sources')}: a diffusion method samples from its policy only "
                               "(sources: [policy])")  # fmt: skip
    else:
        if spec.every is not None:
            raise TrlPlusError(f"{locate(recipe, 'rollout.every')}: text methods sample before every step; every is "
                               "a diffusion rollout's setting")  # fmt: skip
        try:
            check_decoding(rollout.decoding)
        except TrlPlusError as exc:
            raise TrlPlusError(f"{recipe_source(recipe)}: {exc}") from None
    for i, source in enumerate(rollout.sources):
        if source not in ("policy", "reference") and not source.startswith("column:"):
            raise TrlPlusError(f"{locate(recipe, 'rollout.sources')}: {source!r} is not policy, reference or "
                               "column:<name>")  # fmt: skip
    registry = get_registry()
    scorers = []
    for i, item in enumerate(spec.scorers):
        key = f"rollout.scorers.{i}"
        scorer = _configured(recipe, key, registry.get_scorer, item.name, item.args)
        if images != (scorer.inputs in ("pixels", "latents")):
            reads = "images" if images else "text"
            raise TrlPlusError(f"{locate(recipe, key + '.name')}: {item.name} scores "
                               f"{'text' if images else scorer.inputs}, but method {method.name!r} samples {reads} "
                               f"(trl-plus list --scorers)")  # fmt: skip
        if isinstance(item.weight, list) and len(item.weight) != len(scorer.outputs):
            raise TrlPlusError(f"{locate(recipe, key + '.weight')}: {len(item.weight)} weights for the "
                               f"{len(scorer.outputs)} outputs of {item.name} ({', '.join(scorer.outputs)})")
        scorers.append((scorer, item.weight))
    if spec.environment is not None:
        rollout = rollout.updated({"environment": build_environment(recipe, method, spec.environment)})
    return rollout, scorers


def build_environment(recipe: Recipe, method, spec) -> Any:
    """The recipe's ``rollout.environment`` as a configured :class:`~trl_plus.Environment`, checked in one line."""
    key = "rollout.environment"
    if method.trainer != "group":
        raise TrlPlusError(f"{locate(recipe, key)}: multi-turn episodes are played by group methods (PlusGRPOTrainer); "
                           f"{method.name!r} runs on the {method.trainer!r} trainer")  # fmt: skip
    return _configured(recipe, key, get_registry().get_environment, spec.name, spec.args)


def _configured(recipe: Recipe, key: str, lookup: Callable[[str], Any], name: str, args: dict) -> Any:
    """A registered scorer or environment (``lookup``: the registry's getter) built from its recipe block at ``key``
    (``name``, ``args``): an unknown name or a bad argument is one line naming the key."""
    try:
        cls = lookup(name)
    except TrlPlusError as exc:
        raise TrlPlusError(f"{locate(recipe, key + '.name')}: {exc}") from None
    try:
        return cls(cls.Config(**args))
    except ValidationError as exc:
        raise TrlPlusError(explain(exc, recipe_source(recipe), prefix=(*key.split("."), "args"),
                                   model=cls.Config)) from None  # fmt: skip


def _named_metric(name: str, recipe: Recipe) -> tuple[str, dict]:
    """``--metric NAME``: the recipe's own args for it when its ``metrics:`` lists it, else the defaults (β: the
    method's when the metric has one)."""
    for spec in recipe.metrics:
        if spec.name == name:
            return name, spec.args
    return name, {}


def check_model_kind(recipe: Recipe, method) -> None:
    """A diffusion method needs ``model.kind: diffusion`` and a text method a causal LM: one line saying which."""
    diffusion_method = method.trainer == "diffusion"
    if diffusion_method and recipe.model.kind != "diffusion":
        raise TrlPlusError(f"{locate(recipe, 'model.kind')}: method {method.name!r} trains diffusion models: set "
                           "model.kind: diffusion and model.name_or_path to a diffusers pipeline folder (or an alias: "
                           "tiny-sd, tiny-sd3, tiny-flux)")  # fmt: skip
    if not diffusion_method and recipe.model.kind == "diffusion":
        raise TrlPlusError(f"{locate(recipe, 'method')}: method {method.name!r} trains language models (its trainer "
                           f"is {method.trainer!r}), but model.kind is diffusion: use a diffusion method "
                           "(diffusion-dpo, diffusion-sft, ...; `trl-plus list`) or a causal LM")  # fmt: skip


def check_diffusion_model(recipe: Recipe, method, training: dict[str, Any]) -> None:
    """A diffusion recipe's pipeline, read from its JSON files only (an alias is built first; a hub name is left to
    the loader): the folder is a pipeline, the denoiser class is one trl-plus drives, and the scheduler's
    prediction target is one the method can train (and ``training.weighting`` can weight); the scorer's options of
    ``training`` (:func:`~trl_plus.diffusion.scorer.check_scoring_options`) for any pipeline, a hub name's too."""
    from ..diffusion.models import check_denoiser_class, pipeline_facts
    from ..diffusion.scorer import check_scoring_options, check_weighting
    from ..models.load import resolve_model_path

    check_scoring_options(training, lambda key: locate(recipe, key))
    spec = recipe.model
    path = spec.name_or_path
    if path not in get_registry().aliases and not looks_local(path):
        return
    folder = Path(resolve_model_path(path)).expanduser()
    if not folder.is_dir():
        raise TrlPlusError(f"{locate(recipe, 'model.name_or_path')}: no such pipeline folder: {path} (looked for "
                           f"{looked_for(recipe, 'model.name_or_path', path)}; a diffusers pipeline folder, a hub name "
                           f"or an alias: {', '.join(get_registry().aliases)})")  # fmt: skip
    try:
        facts = pipeline_facts(folder, spec.denoiser, spec.scheduler.subfolder if spec.scheduler else "scheduler")
        kind = check_denoiser_class(facts.denoiser_class, f"model.denoiser ({folder / facts.denoiser})")
    except TrlPlusError as exc:
        raise TrlPlusError(f"{recipe_source(recipe)}: {exc}") from None
    kinds = method.scoring.denoisers
    if kinds is not None and kind not in kinds:
        raise TrlPlusError(f"{locate(recipe, 'model.name_or_path')}: {path}'s denoiser is a {facts.denoiser_class} "
                           f"({kind}); method {method.name!r} drives {' / '.join(kinds)} denoisers only")  # fmt: skip
    targets = method.scoring.targets
    if facts.prediction_type not in targets:
        raise TrlPlusError(f"{locate(recipe, 'model.scheduler')}: the scheduler of {path} ({facts.scheduler_class}) "
                           f"predicts {facts.prediction_type}, which method {method.name!r} cannot train (it takes "
                           f"{' / '.join(targets)} targets)")  # fmt: skip
    try:
        check_weighting(training.get("weighting", "half"), facts.prediction_type, locate(recipe, "training.weighting"))
    except TrlPlusError as exc:
        raise TrlPlusError(f"{exc} (the scheduler of {path})") from None


def check_policy_adapters(recipe: Recipe, method) -> None:
    """The named trainable adapters a method reads (``Needs.policy_adapters``) are in ``model.adapters``."""
    wanted = method.needs.policy_adapters
    given = recipe.model.adapters or {}
    missing = [name for name in wanted if name not in given]
    if missing:
        example = ", ".join(f"{name}: {{r: 16}}" for name in wanted)
        raise TrlPlusError(f"{locate(recipe, 'model.adapters')}: method {method.name!r} trains the adapters "
                           f"{', '.join(wanted)}; the recipe has {', '.join(given) or 'none'} (missing "
                           f"{', '.join(missing)}: model.adapters: {{{example}}}, each with its lr_scale)")


def check_teacher_blocks(recipe: Recipe, method, teachers: dict[str, Any]) -> None:
    """The teachers a method needs are there (by name), no others; adapters are adapter folders on a LoRA policy;
    ``mode: precomputed`` only for what columns can hold (label log-probs, top-k)."""
    wanted = method.needs.frozen_sources()
    if method.needs.teacher:
        wanted.setdefault("teacher", ("logps",))
    given = {name: (key, spec) for key, name, spec in recipe.teacher_blocks()}
    for name in wanted:
        if name not in given:
            block = "teacher" if name == "teacher" and not recipe.teachers else f"teachers.{name}"
            raise TrlPlusError(f"{recipe_source(recipe)}: {block}: method {method.name!r} needs a teacher named "
                               f"{name!r} ({block}.name_or_path: a model, or {block}.adapter: a LoRA adapter on the "
                               "policy's base)")  # fmt: skip
    for name, (key, spec) in given.items():
        if name not in wanted:
            hint = did_you_mean(name, list(wanted)) or f" (it uses: {', '.join(wanted) or 'none'})"
            raise TrlPlusError(f"{locate(recipe, key)}: method {method.name!r} uses no teacher named {name!r}{hint}")
        if spec.adapter is not None:
            if not recipe.model.uses_lora:
                raise TrlPlusError(f"{locate(recipe, key + '.adapter')}: a frozen adapter rides the policy's own LoRA "
                                   "base: set model.lora, or load the teacher as a model (name_or_path)")
            folder = Path(spec.adapter).expanduser()
            if not (folder / "adapter_config.json").is_file():
                raise TrlPlusError(f"{locate(recipe, key + '.adapter')}: {spec.adapter} is not a LoRA adapter folder "
                                   f"(no adapter_config.json; looked for {looked_for(recipe, key + '.adapter', spec.adapter)})")
        if spec.mode == "precomputed" and any(kind in HIDDEN_KINDS for kind in wanted[name]):
            raise TrlPlusError(f"{locate(recipe, key + '.mode')}: precomputed columns hold label log-probs and top-k "
                               f"only; method {method.name!r} reads {name!r}'s logits or hidden states at every step: "
                               "use mode: live")  # fmt: skip


def looked_for(recipe: Recipe, key: str, path: str) -> str:
    """The absolute paths a recipe's relative ``path`` was looked for at: the recipe's folder (unless it came from
    ``--set``), then the working directory."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return str(given)
    places = [Path.cwd()]
    if not is_overridden(key, recipe._overridden) and recipe_source(recipe) != "<recipe>":
        places.insert(0, Path(recipe_source(recipe)).resolve().parent)
    return " and ".join(dict.fromkeys(str((place / given).resolve()) for place in places))


def check_chat_template(tokenizer, datasets: dict[str, Any], recipe: Recipe, method) -> None:
    """Data in chat messages needs a tokenizer with a chat template: one line naming the split, the column and the
    model, instead of transformers' error in the middle of tokenizing."""
    if getattr(tokenizer, "chat_template", None):
        return
    for split, dataset in datasets.items():
        columns = message_columns(getattr(dataset, "features", None), method) if dataset is not None else []
        if columns:
            raise TrlPlusError(
                f"{locate(recipe, f'data.{split}.path')}: column {columns[0]!r} holds chat messages, but the tokenizer "
                f"of {recipe.model.name_or_path} has no chat template; use plain-text columns, or a model whose "
                "tokenizer has one (its tokenizer_config.json chat_template, or chat_template.jinja)"
            )


def default_output_dir(method) -> str:
    """Where a run goes when the recipe does not say: ``runs/<method>``."""
    return f"runs/{method.name}"


def resume_target(value: Any, output_dir: str) -> str | None:
    """The checkpoint folder ``training.resume_from_checkpoint`` names (``true``: the latest in ``output_dir``; for a
    run in stages or iterations, ``output_dir`` itself), or ``None``; an error when there is none."""
    if value in (None, False):
        return None
    if value is True:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None and any(Path(output_dir).glob("stage-*/")) or any(Path(output_dir).glob("iter-*/")):
            return output_dir  # a run in stages or iterations: each resumes in its own folder (trainers/stages.py)
        if last is None:
            raise TrlPlusError(f"training.resume_from_checkpoint: no checkpoint-* folder in {output_dir}")
        return last
    if not Path(str(value)).is_dir():
        raise TrlPlusError(f"training.resume_from_checkpoint: no such checkpoint folder: {value}")
    return str(value)


def check_pairs_for_online(columns: list[str], recipe: Recipe, method, where: str) -> None:
    """An online method samples its own pairs: a preference file whose ``chosen``/``rejected`` no rollout source
    reads (``column:chosen``, as SELM's) would be ignored silently, so it is an error naming the offline way."""
    rollout = method.needs.rollout
    if rollout is None or not {"chosen", "rejected"} <= set(columns):
        return
    sources = list(recipe.rollout.sources or ()) if recipe.rollout else []
    if any(s in ("column:chosen", "column:rejected") for s in [*rollout.sources, *sources]):
        return
    raise TrlPlusError(f"{where}: has chosen/rejected pairs, but method {method.name!r} samples its own and would "
                       "ignore them: give prompts only (a prompt column), or train offline (e.g. method: dpo)")


def load_split(recipe: Recipe, method, which: str):
    """The recipe's ``data.<which>`` split (``train`` or ``eval``) as a dataset whose columns ``method`` can read,
    or ``None`` when the recipe has no such split."""
    spec = recipe.data.train if which == "train" else recipe.data.primary_eval
    if spec is None:
        return None
    where = f"{recipe_source(recipe)}: data.{which}"
    dataset = load_preferences(spec.path, spec.split, spec.limit, where=where, columns=spec.columns, name=spec.name)
    located = f"{recipe_source(recipe)}: data.{which} ({spec.path})"
    check_columns(dataset.column_names, method, located)
    check_pairs_for_online(dataset.column_names, recipe, method, located)
    check_text_columns(dataset.features, method, located)
    check_lists(dataset, method, located)
    dataset, warnings = check_rows(dataset, method, f"{where}.path", spec.path if looks_local(spec.path) else None)
    for line in warnings:
        _warn_once(line)
    if hasattr(method, "prepare_split"):  # a method whose rows name files (diffusion: images) checks them here
        dataset = method.prepare_split(dataset, recipe, which)
    return prepare_rows(dataset, method, which, located)


def load_metric_sets(recipe: Recipe, split: str = "eval", data: str | None = None) -> dict[str, Any]:
    """The raw rows metrics run on, by set name: the recipe's held-out sets (``split="eval"``: ``data.eval``, one or
    named) or its training data (``"train"``); ``data`` (a file) replaces them with one set named after it."""
    if data is not None:
        return {Path(data).stem: load_preferences(data, "train", None, where=f"--data {data}")}
    if split == "train":
        sets = {"train": recipe.data.train}
    else:
        sets = recipe.data.eval_sets()
    out = {}
    for name, spec in sets.items():
        key = "data.train" if split == "train" else ("data.eval" if len(sets) == 1 else f"data.eval.{name}")
        out[name] = load_preferences(spec.path, spec.split, spec.limit, where=f"{recipe_source(recipe)}: {key}",
                                     columns=spec.columns, name=spec.name)  # fmt: skip
    return out


_WARNED: set[str] = set()


def _warn_once(line: str) -> None:
    """A data warning on stderr, once per process (train reads the eval split twice: the trainer, the report)."""
    import logging

    if line not in _WARNED:
        _WARNED.add(line)
        logging.getLogger("trl_plus").warning(f"warning: {line}")


def training_value(training: dict[str, Any], key: str) -> Any:
    """A ``training`` value as the run will see it: the recipe's, else ``trl.DPOConfig``'s default."""
    import dataclasses

    from trl import DPOConfig

    if key in training:
        return training[key]
    return next(f.default for f in dataclasses.fields(DPOConfig) if f.name == key)


def check_lengths(recipe: Recipe, method, training: dict[str, Any], datasets: dict[str, Any]) -> list[str]:
    """What ``training.max_length`` does to the recipe's data, measured with the model's tokenizer only: one line per
    split that truncation cuts (per side: sequences, prompt and completion tokens lost) or that loses examples to
    TRL's fully-truncated filter; an error when a split would lose every example. ``datasets``: split -> dataset.
    The tokenizer is read from local files only (a hub model not downloaded yet: ``cannot load a tokenizer``)."""
    if recipe.model.kind == "diffusion":
        return []  # images: no tokens to cut
    if method.needs.rollout is not None:
        return []  # online: the data are prompts; the sequences the collator cuts are sampled during training
    max_length, mode = training_value(training, "max_length"), training_value(training, "truncation_mode")
    if max_length is None:
        return []
    model = recipe.model
    tokenizer = load_tokenizer(model.name_or_path, model.revision, model.trust_remote_code, model.gguf_file,
                               local_files_only=True)  # validation never waits on the network  # fmt: skip
    from ..data.collate import (
        method_collator,  # torch: only once the recipe is known to be valid
    )

    check_chat_template(tokenizer, datasets, recipe, method)
    method.tokenizer = tokenizer
    collator = method_collator(method, tokenizer.pad_token_id, max_length, mode)
    if method.tokenize is None:
        def tokenize(example):
            return tokenize_pair(example, tokenizer)
    else:
        def tokenize(example):
            return method.tokenize(example, tokenizer=tokenizer)
    source, lines = recipe_source(recipe), []
    for split, dataset in datasets.items():
        if dataset is None:
            continue
        where = f"{source}: data.{split} ({getattr(recipe.data, split).path})"
        with quiet_progress(few_rows(dataset)):
            rows = dataset.map(tokenize, desc=f"Measuring token lengths of data.{split}",
                               remove_columns=dataset.column_names)  # fmt: skip
            rows = rows.select_columns([c for c in method.tokenized_columns if c in rows.column_names])
            if method.tokenize is None:
                dropped = fully_truncated(map(len, rows["prompt_ids"]), max_length, mode)
                if dropped == len(rows):
                    raise TrlPlusError(dropped_message(dropped, len(rows), max_length, where))
                if dropped:
                    lines.append(dropped_message(dropped, len(rows), max_length, where))
                    rows = rows.filter(lambda row: len(row["prompt_ids"]) < max_length)
        report = truncation_report(collator, iter(rows), max_length, mode)
        if report is not None and report.any:
            lines.append(report.summary(where))
    return lines


def plan_iterations(recipe: Recipe, method):
    """The recipe's ``iterations:`` block, checked before any model loads (``None``: no iterations): an online
    method's, ``reference: previous`` only with a reference (the default then), per-iteration ``training`` keys as
    ``training``'s own, no ``stages:`` beside it. A method whose rollout is per iteration gets the defaults."""
    spec = recipe.iterations
    rollout = method.needs.rollout
    if spec is None:
        if rollout is not None and rollout.when == "iteration":
            spec = IterationsSpec()
        else:
            return None
    if rollout is None:
        raise TrlPlusError(f"{locate(recipe, 'iterations')}: method {method.name!r} trains on its data, it samples "
                           "nothing: iterations are for online methods (trl-plus list --by family)")  # fmt: skip
    if recipe.stages is not None:
        raise TrlPlusError(f"{locate(recipe, 'iterations')}: a run has stages or iterations, not both")
    mode = resolve_reference_mode(method, recipe.reference.mode, recipe.model.uses_lora,
                                  recipe.reference.name_or_path is not None, iterated=True)  # fmt: skip
    if spec.reference == "previous" and mode == "none":
        raise TrlPlusError(f"{locate(recipe, 'iterations.reference')}: method {method.name!r} runs without a "
                           "reference, so none can be promoted; drop iterations.reference")  # fmt: skip
    if (mode == "precomputed" and spec.reference == "initial" and not recipe.model.uses_lora
            and not recipe.reference.name_or_path):  # fmt: skip
        raise TrlPlusError(f"{locate(recipe, 'reference.mode')}: precomputed with iterations.reference: initial and "
                           "full fine-tuning needs the initial model after iteration 1: use model.lora, "
                           "reference.name_or_path, or reference.mode: model")  # fmt: skip
    if len(spec.training) > spec.count:
        raise TrlPlusError(f"{locate(recipe, 'iterations.training')}: {len(spec.training)} entries for "
                           f"{spec.count} iterations (iterations.count)")  # fmt: skip
    training = []
    for i, overrides in enumerate(spec.training):

        def where(key: str, i: int = i) -> str:
            return locate(recipe, "iterations." + key.replace("training.", f"training.{i}.", 1))

        for key in ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", *RUN_TRAINING_KEYS):
            if key in overrides:
                raise TrlPlusError(f"{where('training.' + key)}: a run-wide setting: set it in training:")
        training.append(validate_training(dict(overrides), where))
    reference = spec.reference or ("initial" if mode == "none" else "previous")
    return spec.model_copy(update={"reference": reference, "training": training})


def plan_stages(recipe: Recipe, method, train_dataset) -> list | None:
    """The training stages the recipe runs (``None``: one plain ``train()``), checked before any model loads: the
    method's :meth:`~trl_plus.Method.stages` (or one per value of ``stages.by``), narrowed by ``stages.only``, with
    ``stages.refresh_reference`` applied; a refresh asked of a run without a reference is an error."""
    from ..trainers.stages import select_stages, stages_by

    spec = recipe.stages

    def where(key: str) -> str:
        return locate(recipe, f"stages.{key}")

    if spec is not None and spec.by:
        stages = stages_by(spec.by, train_dataset, bool(spec.refresh_reference), where("by"))
    else:
        stages = method.stages(train_dataset)
    if not stages:
        if spec is not None and (spec.only or spec.refresh_reference):
            key = "only" if spec.only else "refresh_reference"
            raise TrlPlusError(f"{where(key)}: method {method.name!r} has no stages; use stages.by: <column> to run "
                               "one stage per value of a data column")  # fmt: skip
        return None
    stages = select_stages(stages, spec.only if spec else None, spec.refresh_reference if spec else None, where("only"))
    if any(stage.refresh_reference for stage in stages):
        mode = resolve_reference_mode(method, recipe.reference.mode, recipe.model.uses_lora,
                                      recipe.reference.name_or_path is not None)  # fmt: skip
        if mode == "none":
            raise TrlPlusError(f"{where('refresh_reference')}: method {method.name!r} runs without a reference, so "
                               "there is none to refresh; set stages.refresh_reference: false")  # fmt: skip
    return stages
