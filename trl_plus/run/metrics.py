"""``trl-plus eval TARGET --metric NAME``: metrics (:class:`~trl_plus.Metric`) on a recipe's model, a finished run or
a checkpoint, run by the same trainer code that ran the recipe's ``metrics:`` during training
(``trl_plus.trainers.evaluation``), so the figures agree to float precision."""

from __future__ import annotations

from pathlib import Path

from ..config import recipe_source
from ..errors import TrlPlusError
from ..models.load import load_model
from ..registry import get_registry
from .evaluate import locate_run


def metrics_trainer(recipe, trained: Path | None):
    """A :class:`~trl_plus.PlusTrainer` over the ``trained`` model (a LoRA adapter on the recipe's base, or full
    weights; ``None``: the recipe's model) with the run's reference (adapter off, or the recipe's model), its
    ``training`` arguments and teachers, and no data: what the recipe's ``metrics:`` ran on during training."""
    from ..config import ModelSpec
    from ..trainers import trainer_class
    from .train import base_model_name, build_teachers, recipe_tokenizer, training_args
    from .validate import check_recipe, load_split

    method, training = check_recipe(recipe)
    trainer_cls = trainer_class(method)
    if hasattr(trainer_cls, "from_recipe"):
        raise TrlPlusError(f"method {method.name!r} runs on the {method.trainer!r} trainer: its evaluation is the "
                           "trainer's own (trl-plus eval without --metric)")  # fmt: skip
    training = {**training, "report_to": "none", "disable_tqdm": training.get("disable_tqdm", False)}
    args = training_args(recipe, method, training)
    tokenizer = recipe_tokenizer(recipe)
    base_spec = recipe.model.model_copy(update={"lora": None})
    peft = trained is not None and (trained / "adapter_config.json").is_file()
    ref_model, mode = None, recipe.reference.mode
    if peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base_spec, trainable=False), str(trained), is_trainable=False)
        mode = "adapter" if mode in ("auto", "precomputed", "adapter") else mode
    else:
        spec = base_spec if trained is None else ModelSpec(name_or_path=str(trained), dtype=recipe.model.dtype)
        model = load_model(spec, trainable=False)
        if method.needs.reference != "no" and recipe.reference.mode != "none":
            ref_spec = base_spec if not recipe.reference.name_or_path else base_spec.model_copy(
                update={"name_or_path": recipe.reference.name_or_path, "gguf_file": recipe.reference.gguf_file})
            ref_model, mode = load_model(ref_spec, trainable=False, key="reference"), "model"
    rows = load_split(recipe, method, "train")  # TRL's trainer wants training rows: one is enough
    trainer = trainer_cls(model, ref_model=ref_model, args=args, method=method, reference_mode=mode,
                          teachers=build_teachers(recipe, tokenizer), processing_class=tokenizer,
                          train_dataset=rows.select(range(1)), base_model=base_model_name(recipe.model))  # fmt: skip
    if peft and "ref" in model.peft_config:  # TRL copies a loaded adapter as its reference ("ref"); the run's
        model.delete_adapter("ref")  # reference was the base (a refreshed reference of stages is not saved)
    return trainer


def evaluate_metrics(
    target: str | Path,
    metrics: list[str] | None = None,
    data: str | None = None,
    limit: int | None = None,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Run metrics (``metrics``: names; default the recipe's ``metrics:``) on a recipe's model, a run's final model
    or a checkpoint, exactly as training ran them at ``eval_steps``; ``data`` is a pairs file, or ``train`` for the
    recipe's training data (default: each metric's split: the held-out sets, or the training data). Returns
    ``{set: {metric: MetricResult}}``; artefacts under ``out_dir`` (default ``<run>/metrics/eval-<name>``)."""
    from .validate import build_metrics, load_metric_sets

    recipe, trained, label = locate_run(target, overrides)
    method = get_registry().get(recipe.method)(recipe.method_args)
    chosen = build_metrics(recipe, method, names=metrics) if metrics else build_metrics(recipe, method)
    if not chosen:
        raise TrlPlusError(f"{recipe_source(recipe)}: no metrics: pass --metric NAME[,NAME] or add `metrics:` "
                           "to the recipe (trl-plus list --metrics)")  # fmt: skip
    sets: dict[str, dict] = {}
    for metric in chosen:
        split = "train" if data == "train" else metric.split
        if split not in sets:
            sets[split] = load_metric_sets(recipe, split, None if data in (None, "train") else data)
            if limit:
                sets[split] = {n: d.select(range(min(limit, len(d)))) for n, d in sets[split].items()}
        if not sets[split]:
            raise TrlPlusError(f"{recipe_source(recipe)}: data.eval: metric {metric.name!r} runs on held-out "
                               "pairs and the recipe has none: add data.eval or pass --data FILE (or train)")
    trainer = metrics_trainer(recipe, trained)
    run_dir = trained if trained is not None else Path(recipe.training.get("output_dir", "runs"))
    out_dir = Path(out_dir) if out_dir else run_dir / "metrics" / f"eval-{label}"
    results: dict = {}
    for split, per_set in sets.items():
        for set_name, per_metric in trainer.run_metrics([m for m in chosen if ("train" if data == "train" else
                                                         m.split) == split], per_set, out_dir).items():  # fmt: skip
            results.setdefault(set_name, {}).update(per_metric)
    return results
