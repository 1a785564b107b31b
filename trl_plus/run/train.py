"""``trl_plus.train(recipe)``: a validated recipe in, a trained model and its logs in ``output_dir`` out (the
files are those of ``trl_plus.run.rundir``)."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ModelSpec, Recipe, load_recipe, recipe_source
from ..errors import TrlPlusError
from ..models.load import (
    bf16_available,
    check_lora_targets,
    load_model,
    load_tokenizer,
    peft_configs,
    resolve_model_path,
)  # fmt: skip
from ..trainers import trainer_class
from ..trainers.columns import folder_identity
from ..trainers.frozen import Teacher, resolve_reference_mode
from ..trainers.guard import last_checkpoint
from ..trainers.iterations import run_iterations
from ..trainers.stages import run_stages
from .card import complete_model_card
from .evaluate import PairScores, metrics_report, metrics_table, recipe_beta, report_from_scores, score_pairs
from .report import plot_run
from .rundir import (
    EVAL_REPORT,
    METRICS_DIR,
    METRICS_REPORT,
    RESOLVED_RECIPE,
    STATE_FILE,
    clear_run_dir,
    last_metrics,
)
from .validate import (
    build_metrics,
    build_rollout,
    check_chat_template,
    check_recipe,
    default_output_dir,
    load_metric_sets,
    load_split,
    plan_iterations,
    plan_stages,
    resume_target,
)


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    output_dir: str
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged value of each training metric
    interrupted: bool = False
    checkpoint: str | None = None
    is_main_process: bool = True  # False on the other ranks of an `accelerate launch` run
    evaluation: Any = None  # trl_plus.run.evaluate.EvalReport: held-out pairs before/after (when data.eval is set)
    plot: str | None = None  # the training-curves PNG
    metric_results: Any = None  # {set: {metric: MetricResult}} of the recipe's metrics on the final model


    def summary(self) -> str:
        """The closing lines printed by ``trl-plus train``."""
        m = self.metrics
        lines = [f"{'interrupted' if self.interrupted else 'finished'} after {self.global_step} steps"]
        if "loss" in m:
            lines.append(f"  final loss          {m['loss']:.4f}")
        if "rewards/accuracies" in m:
            lines.append(f"  reward accuracy     {m['rewards/accuracies']:.3f}")
        if "rewards/margins" in m:
            lines.append(f"  reward margin       {m['rewards/margins']:.4f}")
        lines.append(f"  outputs             {self.output_dir}")
        if self.plot:
            lines.append(f"  training curves     {self.plot}")
        if self.checkpoint:
            lines.append(f"  checkpoint          {self.checkpoint}")
            lines.append(f"  resume with         --set training.resume_from_checkpoint={self.checkpoint}")
        elif self.interrupted:
            lines.append("  nothing to resume   no step was trained: run the same command to start again")
        if self.evaluation is not None:
            lines += ["", self.evaluation.table()]
        if self.metric_results:
            lines += ["", metrics_table(self.metric_results)]
        return "\n".join(lines)


def build_trainer(recipe: Recipe, callbacks: list | None = None, model: Any = None):
    """Everything ``train`` does before ``trainer.train()``: data, models, config, and the trainer of the method's
    kind (``Method.trainer``; ``preference``: :class:`~trl_plus.PlusTrainer`; ``group``:
    :class:`~trl_plus.PlusGRPOTrainer`). ``model``: train this policy (a phase's: the previous phase's model, LoRA
    and all) instead of loading ``recipe.model``."""

    method, training = check_recipe(recipe)
    trainer_cls = trainer_class(method)
    train_dataset = load_split(recipe, method, "train")  # data problems surface before any model loads
    eval_dataset = load_split(recipe, method, "eval")
    if getattr(method, "inference_only", None):
        raise TrlPlusError(f"{recipe_source(recipe)}: method {method.name!r} trains nothing: "
                           f"{method.inference_only}")  # fmt: skip
    stages = plan_stages(recipe, method, train_dataset)
    if hasattr(trainer_cls, "from_recipe"):  # a trainer kind that builds its own models (diffusion pipelines)
        training.setdefault("output_dir", default_output_dir(method))
        kept = {} if model is None else {"model": model}  # a phase's policy, as the previous phase left it
        trainer = trainer_cls.from_recipe(recipe, method, training, train_dataset, eval_dataset, callbacks=callbacks,
                                          **kept, **_online(recipe, method))  # fmt: skip
        trainer.stages = stages
        return trainer

    if method.trainer == "group":
        return build_group_trainer(recipe, method, training, train_dataset, eval_dataset, stages, callbacks, model)
    args = training_args(recipe, method, training, has_eval=eval_dataset is not None)
    tokenizer, model, peft_config, lr_scales = _policy(recipe, method, args, train_dataset, eval_dataset, model)
    mode = resolve_reference_mode(method, recipe.reference.mode, peft_config is not None, False,
                                  iterated=recipe.iterations is not None)  # fmt: skip
    ref_model = None
    if mode == "model" or (mode == "precomputed" and recipe.reference.name_or_path):
        ref_spec = recipe.model
        if recipe.reference.name_or_path or recipe.reference.dtype:
            ref_spec = ModelSpec(
                name_or_path=recipe.reference.name_or_path or recipe.model.name_or_path,
                gguf_file=recipe.reference.gguf_file if recipe.reference.name_or_path else recipe.model.gguf_file,
                dtype=recipe.reference.dtype or recipe.model.dtype,
                quantization=recipe.model.quantization,
            )
        ref_model = load_model(ref_spec, trainable=False, key="reference")
    reference_identity = None
    if mode == "precomputed":  # the column cache names the reference by its files, not by a hash of its weights
        spec = ref_spec if ref_model is not None else recipe.model
        reference_identity = model_identity(spec, "reference" if ref_model is not None else "model")
    trainer = trainer_cls(
        model,
        ref_model=ref_model,
        args=args,
        method=method,
        reference_mode=mode,
        teachers=build_teachers(recipe, tokenizer),
        reference_identity=reference_identity,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        adapter_lr_scales=lr_scales,
        callbacks=callbacks,
        base_model=base_model_name(recipe.model),
        nan=recipe.training.get("nan", "stop"),
        prefix_sharing=recipe.training.get("prefix_sharing", False),
        packing=recipe.training.get("packing", False),
        **_online(recipe, method),
    )
    trainer.stages = stages  # None: one plain train()
    trainer.iterations = plan_iterations(recipe, method)  # None: no outer iterations
    metrics = build_metrics(recipe, method)
    if metrics:
        splits = {m.split for m in metrics}
        trainer.set_metrics(metrics, {split: load_metric_sets(recipe, split) for split in splits},
                            artefacts_dir=str(Path(args.output_dir) / METRICS_DIR))  # fmt: skip
    return trainer


def training_args(recipe: Recipe, method, training: dict[str, Any], has_eval: bool = False, config_cls: Any = None):
    """The run's ``trl.DPOConfig`` (or ``config_cls``: a group method's ``trl.GRPOConfig``): the recipe's
    ``training`` block (validated) over trl-plus's defaults (no reports, checkpointing as
    ``model.gradient_checkpointing`` says, bf16 where the hardware has it)."""
    import torch
    from trl import DPOConfig

    config_cls = config_cls or DPOConfig

    training.setdefault("output_dir", default_output_dir(method))
    training.setdefault("report_to", "none")
    if recipe.model.gradient_checkpointing is not None:
        training["activation_checkpointing"] = recipe.model.gradient_checkpointing
    # TRL's default (on), passed under transformers' current name: DPOConfig's own default sets the deprecated one
    training.setdefault("activation_checkpointing", config_cls.gradient_checkpointing)
    if "bf16" not in training and "fp16" not in training:
        training["bf16"] = bf16_available()
    training.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    if launched_without_gpus():
        training.setdefault("use_cpu", True)
    if has_eval:
        training.setdefault("eval_strategy", "steps")
    return config_cls(**training)


def _policy(recipe: Recipe, method, args, train_dataset, eval_dataset, model: Any = None) -> tuple[Any, ...]:
    """``(tokenizer, model, peft_config, lr_scales)`` of every trainer kind: the tokenizer (its chat template checked
    against the data), the recipe's model loaded (its LoRA targets checked, LoRA as configured), or ``model`` as
    given (a phase's policy: already wrapped in its adapters when it has any, no second wrap)."""
    tokenizer = recipe_tokenizer(recipe)
    check_chat_template(tokenizer, {"train": train_dataset, "eval": eval_dataset}, recipe, method)
    if model is None:
        try:
            check_lora_targets(recipe.model, resolve_model_path(recipe.model.name_or_path, recipe.model.gguf_file))
        except TrlPlusError as exc:
            raise TrlPlusError(f"{recipe_source(recipe)}: {exc}") from None
        return (tokenizer, load_model(recipe.model, gradient_checkpointing=args.activation_checkpointing),
                *peft_configs(recipe.model))  # fmt: skip
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        return tokenizer, model, None, None
    return tokenizer, model, *peft_configs(recipe.model)


def build_group_trainer(recipe: Recipe, method, training, train_dataset, eval_dataset, stages, callbacks,
                        model: Any = None):  # fmt: skip
    """A group method's :class:`~trl_plus.PlusGRPOTrainer` from the recipe: ``training`` as a ``trl.GRPOConfig``,
    the model (LoRA/QLoRA as the model block says), the rollout and its scorers. The reference, when the method's
    ``beta`` > 0, is the adapter off (LoRA) or a frozen copy of the starting policy."""
    from trl import GRPOConfig

    if stages is not None or recipe.iterations is not None:
        raise TrlPlusError(f"{recipe_source(recipe)}: method {method.name!r} is a group-RL method: it runs without "
                           "stages: or iterations:")  # fmt: skip
    if recipe.reference.mode not in ("auto", "model", "adapter") or recipe.reference.name_or_path:
        raise TrlPlusError(f"{recipe_source(recipe)}: reference: a group method's reference is the starting policy (the "
                           "adapter off, or a frozen copy): leave reference.mode at auto")  # fmt: skip
    from ..trainers.group import check_group_batch

    online = _online(recipe, method)
    n = online["rollout"].n
    try:
        check_group_batch(training.get("per_device_train_batch_size", GRPOConfig.per_device_train_batch_size),
                          training.get("gradient_accumulation_steps", 1), int(os.environ.get("WORLD_SIZE", "1")),
                          training.get("generation_batch_size"), training.get("steps_per_generation"), n)  # fmt: skip
    except TrlPlusError as exc:
        raise TrlPlusError(f"{recipe_source(recipe)}: {exc}") from None
    training["num_generations"] = n  # TRL's GRPOConfig checks its batch arithmetic against it when built
    try:
        args = training_args(recipe, method, training, has_eval=eval_dataset is not None, config_cls=GRPOConfig)
    except ValueError as exc:  # GRPOConfig's own checks (auto_find_batch_size, eval batch vs groups...)
        raise TrlPlusError(f"{recipe_source(recipe)}: training: {str(exc).splitlines()[0]}") from None
    tokenizer, model, peft_config, lr_scales = _policy(recipe, method, args, train_dataset, eval_dataset, model)
    if lr_scales:
        raise TrlPlusError(f"{recipe_source(recipe)}: model.adapters: a group method trains one adapter (model.lora)")
    from ..trainers.group import PlusGRPOTrainer

    try:
        trainer = PlusGRPOTrainer(model, method=method, args=args, train_dataset=train_dataset,
                                  eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config,
                                  callbacks=callbacks, nan=recipe.training.get("nan", "stop"), **online)  # fmt: skip
    except TrlPlusError as exc:
        raise TrlPlusError(f"{recipe_source(recipe)}: {exc}") from None
    trainer.stages, trainer.iterations = None, None
    return trainer


def launched_without_gpus() -> bool:
    """True in a process of ``accelerate launch --multi_gpu`` (or ``torchrun``) on a machine without GPUs: the run
    needs ``use_cpu`` for DDP over gloo between the CPU processes (without it transformers starts each process as a
    separate single-process run, measured with transformers 5)."""
    import torch

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def recipe_tokenizer(recipe: Recipe):
    """The tokenizer of the recipe's model."""
    return load_tokenizer(recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code,
                          recipe.model.gguf_file)  # fmt: skip


def _online(recipe: Recipe, method) -> dict[str, Any]:
    """``rollout`` and ``scorers`` keyword arguments of an online method's trainer (none for an offline one)."""
    built = build_rollout(recipe, method)
    return {} if built is None else {"rollout": built[0], "scorers": built[1]}


def model_identity(spec, key: str) -> str:
    """A model's identity in the column cache: its folder (path + weight-file digests), dtype and quantization."""
    quantization = getattr(spec, "quantization", None)
    return folder_identity(resolve_model_path(spec.name_or_path, spec.gguf_file, key), dtype=spec.dtype,
                           quantization=quantization.model_dump() if quantization else None,
                           revision=getattr(spec, "revision", None), gguf_file=spec.gguf_file)  # fmt: skip


def build_teachers(recipe: Recipe, tokenizer) -> dict[str, Teacher]:
    """The recipe's teachers as :class:`~trl_plus.Teacher` s: a live model loaded now, a precomputed one loaded
    only if its columns are not cached, an adapter by its folder; each model's tokenizer checked against the
    policy's first."""
    teachers = {}
    for key, name, spec in recipe.teacher_blocks():
        where = f"{recipe_source(recipe)}: {key}"
        if spec.adapter is not None:
            teachers[name] = Teacher(adapter=spec.adapter, mode=spec.mode, identity=folder_identity(spec.adapter))
            continue
        path = resolve_model_path(spec.name_or_path, spec.gguf_file, key)
        check_same_tokenizer(load_tokenizer(spec.name_or_path, gguf_file=spec.gguf_file), tokenizer, where)
        load = functools.partial(load_model, spec, trainable=False, key=key)
        teachers[name] = Teacher(model=load if spec.mode == "precomputed" else load(), mode=spec.mode,
                                 identity=model_identity(spec, key) if Path(path).exists() else None)  # fmt: skip
    return teachers


def check_same_tokenizer(theirs, ours, where: str) -> None:
    """A teacher scores the policy's tokens, so its vocabulary must be the policy's: one line naming the first
    token that differs."""
    a, b = theirs.get_vocab(), ours.get_vocab()
    if a == b:
        return
    differing = sorted(set(a.items()) ^ set(b.items()), key=lambda item: item[1])
    token, _ = differing[0]
    detail = (f"{token!r} is {a[token] if token in a else 'absent'} in the teacher's and "
              f"{b[token] if token in b else 'absent'} in the policy's")  # fmt: skip
    raise TrlPlusError(f"{where}: the teacher's tokenizer differs from the policy's ({len(a)} vs {len(b)} tokens; "
                       f"{detail}): a teacher must share the policy's tokenizer")  # fmt: skip


def base_model_name(spec: ModelSpec) -> str:
    """How the run's model card names its base model: the recipe's ``name_or_path`` (an alias, a hub id, a folder)
    and its GGUF file, if any."""
    return f"{spec.name_or_path} ({spec.gguf_file})" if spec.gguf_file else spec.name_or_path


def train(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None) -> TrainResult:
    """Train as a recipe says. ``recipe`` is a YAML path, a dict or a :class:`Recipe`; ``overrides`` are
    ``key.path=value`` strings (the CLI's ``--set``).

    The output directory receives the final model (or LoRA adapter) and tokenizer, its model card (``README.md``:
    method, paper, recipe, held-out figures), the resolved recipe (``trl_plus_recipe.yaml``) and
    ``trainer_state.json``. Ctrl-C saves a checkpoint first; resume with
    ``training.resume_from_checkpoint`` (a folder, or ``true`` for the latest one in ``output_dir``).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to a recipe file or dict, not to a Recipe object")
    if recipe.phases is not None:
        return train_phases(recipe)
    try:
        trainer = build_trainer(recipe)  # validates first: the resume target and the output folder's owner too
    except KeyboardInterrupt:  # while loading, or computing reference log-probs (reference.mode: precomputed)
        return interrupted_before_training(recipe)
    output_dir = trainer.args.output_dir
    resume = resume_target(recipe.training.get("resume_from_checkpoint"), output_dir)

    main_process = trainer.accelerator.is_main_process
    if main_process:
        if recipe.training.get("overwrite_output_dir"):
            clear_run_dir(output_dir, protect=_recipe_files(recipe))
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        resolved = recipe.model_dump(mode="json")
        resolved["method_args"] = trainer.method.config.model_dump(mode="json")
        resolved_text = yaml.safe_dump(resolved, sort_keys=False)
        (Path(output_dir) / RESOLVED_RECIPE).write_text(resolved_text)

    held_out = _held_out_scorer(recipe, trainer)
    interrupted, checkpoint = False, None
    try:
        before = held_out() if held_out else None
        if trainer.stages:
            run_stages(trainer, trainer.stages, resume=resume is not None)
        elif getattr(trainer, "iterations", None):
            run_iterations(trainer, trainer.iterations, resume=resume is not None)
        else:
            trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        interrupted = True
        if trainer.state.global_step > 0:  # (a run in stages: into the stage's folder)
            trainer._save_checkpoint(trainer.model, trial=None)
            checkpoint = str(Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}")
        else:  # interrupted before its first step: the resumed one, if any
            checkpoint = last_checkpoint(trainer.args.output_dir)
        print("\ninterrupted: checkpoint saved" if trainer.state.global_step > 0 else
              "\ninterrupted before the first step", file=sys.stderr)  # fmt: skip
    if not interrupted:
        trainer.save_model(output_dir)
    evaluation, plot = None, None
    if held_out and not interrupted:
        evaluation = report_from_scores(before, held_out(), recipe_beta(recipe), recipe.data.primary_eval.path)
    final_metrics = None
    if getattr(trainer, "metrics", ()) and not interrupted:  # the recipe's metrics on the final model
        final_metrics = trainer.run_configured_metrics(Path(output_dir) / METRICS_DIR / "final")
    if main_process:
        if final_metrics is not None:
            (Path(output_dir) / METRICS_REPORT).write_text(json.dumps(metrics_report(final_metrics), indent=2))
        trainer.state.save_to_json(str(Path(output_dir) / STATE_FILE))
        if evaluation is not None:
            (Path(output_dir) / EVAL_REPORT).write_text(json.dumps(evaluation.to_dict(), indent=2))
        if not interrupted:  # the card the save wrote, completed with the recipe and the held-out figures
            complete_model_card(output_dir, recipe, resolved_text, evaluation)
        plot = str(plot_run(output_dir))
    return TrainResult(
        output_dir=output_dir,
        is_main_process=main_process,
        global_step=trainer.state.global_step,
        metrics=last_metrics(trainer.state.log_history),
        interrupted=interrupted,
        checkpoint=checkpoint,
        evaluation=evaluation,
        plot=plot,
        metric_results=final_metrics,
    )


def train_phases(recipe: Recipe) -> TrainResult:
    """``train`` for a recipe with ``phases:`` (:mod:`trl_plus.run.phases`): every phase's recipe validated first,
    the rounds run, the final policy, the tagged log, the model card and the curves written to ``output_dir``."""
    from .phases import run_phases

    if recipe.training.get("resume_from_checkpoint"):
        raise TrlPlusError(f"{recipe_source(recipe)}: training.resume_from_checkpoint: a run with phases does not "
                           "resume yet; each phase's folder (round-<r>-<name>/) holds its final weights")  # fmt: skip
    check_recipe(recipe)  # every phase's recipe too
    done = run_phases(recipe, build_trainer)
    trainer = done["trainer"]
    output_dir = trainer.args.output_dir
    main_process = trainer.accelerator.is_main_process
    trainer.save_model(output_dir)
    if main_process:
        resolved_text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
        (Path(output_dir) / RESOLVED_RECIPE).write_text(resolved_text)
        trainer.state.save_to_json(str(Path(output_dir) / STATE_FILE))
        complete_model_card(output_dir, recipe, resolved_text, None)
        plot = str(plot_run(output_dir))
    return TrainResult(output_dir=output_dir, is_main_process=main_process,
                       global_step=done["steps"],
                       metrics=last_metrics(done["log"]), plot=plot if main_process else None)  # fmt: skip


def interrupted_before_training(recipe: Recipe) -> TrainResult:
    """What a run interrupted before ``trainer.train()`` leaves: no new step, the latest checkpoint already in its
    ``output_dir`` (a resumed run's) to resume from, if any."""
    output_dir = recipe.training.get("output_dir") or f"runs/{recipe.method}"
    checkpoint = last_checkpoint(output_dir)
    step = int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0
    print("\ninterrupted before the first step", file=sys.stderr)
    return TrainResult(output_dir=str(output_dir), global_step=step, interrupted=True, checkpoint=checkpoint)


def _recipe_files(recipe: Recipe) -> list[str]:
    """The recipe file and its local data files (what ``training.overwrite_output_dir`` must never delete)."""
    files = [spec.path for spec in (recipe.data.train, *recipe.data.eval_sets().values())]
    return [f for f in [recipe_source(recipe), *files] if Path(f).exists()]


def _held_out_scorer(recipe: Recipe, trainer):
    """A function scoring the recipe's held-out pairs with the trainer's current model, or ``None`` when the recipe
    has no ``data.eval`` (or ``data.report: false``, or the eval data are not prompt/chosen/rejected pairs)."""
    if recipe.data.eval is None or not recipe.data.report:
        return None
    if hasattr(trainer, "pair_scores"):  # a diffusion run: its own seeded denoising scores of the eval pairs
        if not trainer.are_pairs(trainer.eval_dataset):
            return None
        return lambda: PairScores(trainer.pair_scores(), None)
    if not hasattr(trainer, "_tokenizer"):
        return None
    spec = recipe.data.primary_eval
    dataset = load_split(recipe, trainer.method, "eval")
    if not {"chosen", "rejected"} <= set(dataset.column_names):
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    args = trainer.args
    quiet = args.disable_tqdm or not trainer.accelerator.is_main_process

    def score():
        return score_pairs(model, trainer._tokenizer, dataset, batch_size=args.per_device_eval_batch_size,
                           max_length=args.max_length, desc=f"Scoring held-out pairs ({spec.path})",
                           disable_progress=quiet)  # fmt: skip

    return score
