"""Held-out evaluation of preference pairs, the same for every method: how the model ranks chosen vs rejected.

For each pair the model scores the chosen and the rejected completion by its summed token log-probs
``ℓ(y) = Σ_t log π(y_t | x, y_<t)`` (TRL's tokenization: chat template, EOS, completion tokens only). From those:

- **likelihood ranking accuracy**: the share of pairs with ``ℓ(y_w) > ℓ(y_l)`` (and with the per-token mean, the
  length-normalised variant); ties count one half;
- **implicit-reward accuracy and margin** (DPO-style), against a reference = the model before training:
  ``m = β [(ℓθ(y_w) − ℓref(y_w)) − (ℓθ(y_l) − ℓref(y_l))]``; accuracy is the share with ``m > 0`` (ties count one
  half, so an untrained model scores 0.5, i.e. chance), margin is the mean of ``m``; the mean log-ratio
  ``ℓθ(y) − ℓref(y)`` over both completions says how far the model moved from the reference on this text (a proxy
  of the KL: the KL proper is an expectation over the model's own samples);
- **length statistics** of the pairs (completion tokens), since several methods exist to undo a length bias.

``trl-plus train`` prints this table before/after when the recipe has ``data.eval``; ``trl-plus eval`` prints it for
a recipe or a finished run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..builtin.metrics import length_figures, pair_figures
from ..config import load_recipe, recipe_source
from ..data.collate import PairwiseCollator
from ..data.load import load_preferences
from ..data.tokenize import tokenize_pair
from ..errors import TrlPlusError
from ..models.load import load_model, load_tokenizer
from ..registry import get_registry
from .rundir import RESOLVED_RECIPE, check_run_owner, trained_model_path


@dataclass
class PairScores:
    """Per-pair sequence log-probs of one model: ``logps[i] = (ℓ(chosen), ℓ(rejected))``, ``lengths`` likewise
    (``None`` for images: a diffusion run's ℓ = −w·ē per image, :meth:`DiffusionTrainer.pair_scores`)."""

    logps: Any  # torch.Tensor [N, 2], float64
    lengths: Any  # torch.Tensor [N, 2], float64, or None


def _tokenized_pairs(dataset, tokenizer) -> list[dict]:
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise TrlPlusError(
            f"held-out evaluation needs pairs with columns prompt, chosen, rejected; the data lacks {', '.join(missing)}"
        )
    return [tokenize_pair(example, tokenizer) for example in dataset]


def score_pairs(
    model,
    tokenizer,
    dataset,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    desc: str = "Scoring held-out pairs",
    disable_progress: bool = False,
) -> PairScores:
    """Sum of completion-token log-probs of chosen and rejected for every pair of ``dataset`` (no gradients).

    ``model`` carries TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, as every PlusTrainer policy
    does): per-token log-probs come out without materialising the ``[B, L, vocab]`` logits, exactly as the trainer
    computes them.
    """
    import torch
    from tqdm.auto import tqdm

    rows = _tokenized_pairs(dataset, tokenizer)
    collate = PairwiseCollator(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    device = next(model.parameters()).device
    logps, lengths = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=disable_progress):
                chunk = rows[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk).items()}
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                                use_cache=False, fused_lm_head=True)  # fmt: skip
                mask = batch["completion_mask"][:, 1:].double()
                seq = (outputs.log_probs.double() * mask).sum(-1).cpu()
                count = mask.sum(-1).cpu()
                n = len(chunk)
                logps.append(torch.stack([seq[:n], seq[n:]], dim=1))
                lengths.append(torch.stack([count[:n], count[n:]], dim=1))
    finally:
        model.train(was_training)
    return PairScores(torch.cat(logps), torch.cat(lengths))


def pair_metrics(scores: PairScores, reference: PairScores | None = None, beta: float = 0.1) -> dict[str, float]:
    """The held-out metrics of one model (see the module docstring); reward metrics only with a ``reference``."""
    lengths = scores.lengths if scores.lengths is not None else scores.logps.new_ones(scores.logps.shape)
    figures = pair_figures(scores.logps[:, 0], scores.logps[:, 1], lengths,
                           None if reference is None else reference.logps, beta)  # fmt: skip
    if scores.lengths is None:  # images: no length to normalise by
        figures.pop("normalized_likelihood_accuracy")
    return figures


def length_stats(scores: PairScores) -> dict[str, float]:
    """Completion lengths of the pairs, in tokens (only the pair count for images)."""
    if scores.lengths is None:
        return {"pairs": float(scores.logps.size(0))}
    return length_figures(scores.lengths)


ROWS = (
    ("reward_accuracy", "implicit-reward accuracy", "{:.3f}"),
    ("reward_margin", "implicit-reward margin (β·Δ)", "{:+.4f}"),
    ("log_ratio", "mean log πθ/πref per completion", "{:+.3f}"),
    ("likelihood_accuracy", "likelihood ranking accuracy", "{:.3f}"),
    ("normalized_likelihood_accuracy", "  per-token (length-normalised)", "{:.3f}"),
    ("logps/chosen", "mean log-prob, chosen", "{:.2f}"),
    ("logps/rejected", "mean log-prob, rejected", "{:.2f}"),
)


#: What a diffusion run's held-out table means (it has no lengths).
IMAGE_NOTE = ("images: log-prob = ℓ = −w·ē (the denoising score) averaged over the same seeded (t, ε) draws for both "
              "images of a pair and for both models")


def format_report(columns: dict[str, dict[str, float]], lengths: dict[str, float], beta: float, source: str) -> str:
    """A plain-text table: one row per metric, one column per model state (``before``, ``after``)."""
    names = list(columns)
    lines = [
        f"held-out pairs: {int(lengths['pairs'])} from {source}  (β = {beta:g}; reference = the model before training)",
        f"{'':32}" + "".join(f"{n:>10}" for n in names),
    ]
    images = "chosen_tokens" not in lengths
    for key, label, fmt in ROWS:
        fmt = "{:.5f}" if images and key.startswith("logps/") else fmt  # ℓ = −w·ē is small
        if any(key in columns[n] for n in names):
            lines.append(f"{label:32}" + "".join(f"{fmt.format(columns[n][key]) if key in columns[n] else '-':>10}"
                                                 for n in names))  # fmt: skip
    if "chosen_tokens" in lengths:
        lines.append(
            f"lengths: chosen {lengths['chosen_tokens']:.1f} tokens, rejected {lengths['rejected_tokens']:.1f} tokens "
            f"on average; chosen is longer in {100 * lengths['chosen_longer']:.0f}% of pairs"
        )
    else:
        lines.append(IMAGE_NOTE)
    return "\n".join(lines)


@dataclass
class EvalReport:
    """Before/after metrics on held-out pairs, as ``trl-plus eval`` and ``trl-plus train`` print them."""

    before: dict[str, float]
    after: dict[str, float] | None
    lengths: dict[str, float]
    beta: float
    source: str

    def table(self) -> str:
        """The report as a plain-text table."""
        columns = {"before": self.before} | ({"after": self.after} if self.after is not None else {})
        return format_report(columns, self.lengths, self.beta, self.source)

    def markdown(self) -> str:
        """The report as a Markdown table (the run's model card): the rows and figures of :meth:`table`."""
        columns = {"before": self.before} | ({"after": self.after} if self.after is not None else {})
        lines = [
            f"{int(self.lengths['pairs'])} held-out pairs from `{self.source}` (β = {self.beta:g}; reference = the "
            "model before training).",
            "",
            "| metric | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for key, label, fmt in ROWS:
            if any(key in c for c in columns.values()):
                if "chosen_tokens" not in self.lengths and key.startswith("logps/"):
                    fmt = "{:.5f}"  # images: ℓ = −w·ē is small
                cells = [fmt.format(c[key]) if key in c else "-" for c in columns.values()]
                name = "↳ " + label.strip() if label.startswith(" ") else label  # a sub-row of the one above
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lengths = self.lengths
        if "chosen_tokens" not in lengths:
            return "\n".join([*lines, "", IMAGE_NOTE + "."])
        lines += ["", f"Completion lengths: chosen {lengths['chosen_tokens']:.1f} tokens, rejected "
                  f"{lengths['rejected_tokens']:.1f} tokens on average; chosen is longer in "
                  f"{100 * lengths['chosen_longer']:.0f}% of pairs."]  # fmt: skip
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (written as ``eval_report.json`` in a run directory)."""
        return {"before": self.before, "after": self.after, "lengths": self.lengths, "beta": self.beta,
                "source": self.source}  # fmt: skip


def report_from_scores(before: PairScores, after: PairScores | None, beta: float, source: str) -> EvalReport:
    """An :class:`EvalReport` from the scores of the model before and (optionally) after training."""
    return EvalReport(
        before=pair_metrics(before, before, beta),
        after=pair_metrics(after, before, beta) if after is not None else None,
        lengths=length_stats(before),
        beta=beta,
        source=source,
    )


def recipe_beta(recipe) -> float:
    """β for the implicit reward: the method's own ``beta`` when it has one, else DPO's default 0.1."""
    value = recipe.method_args.get("beta")
    if value is None:
        field = get_registry().get(recipe.method).Config.model_fields.get("beta")
        value = field.default if field is not None and field.default is not None else 0.1
    return float(value)


def evaluate(
    target: str | Path,
    data: str | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    overrides: list[str] | None = None,
) -> EvalReport:
    """Evaluate a recipe or a finished run directory on held-out pairs.

    ``target`` is a recipe file (its model is "before"; "after" is its ``training.output_dir`` when that holds a
    trained model) or a run directory (which holds ``trl_plus_recipe.yaml``). ``data`` overrides the recipe's
    ``data.eval.path``.
    """
    from trl.trainer.utils import add_fused_lm_head

    target = Path(target)
    recipe_file = target / RESOLVED_RECIPE if target.is_dir() else target
    if not recipe_file.is_file():
        raise TrlPlusError(f"{target}: not a recipe file nor a run directory with {RESOLVED_RECIPE}")
    recipe = load_recipe(recipe_file, overrides)
    run_dir = target if target.is_dir() else Path(recipe.training.get("output_dir", ""))
    if not target.is_dir():
        check_run_owner(run_dir, recipe.method, recipe.model)
    spec = recipe.data.primary_eval
    path = data or (spec.path if spec else None)
    if path is None:
        raise TrlPlusError(f"{recipe_file}: data.eval: no held-out pairs; add data.eval.path or pass --data FILE")
    if recipe.model.kind == "diffusion":
        if data:
            recipe = load_recipe(recipe_file, [*(overrides or []), f"data.eval.path={data}"])
        return evaluate_diffusion(recipe, run_dir, limit, batch_size)
    where = f"{recipe_file}: data.eval"
    columns = spec.columns if spec and not data else {}
    dataset = load_preferences(path, spec.split if spec else "train", limit or (spec.limit if spec else None), where,
                               columns)  # fmt: skip
    batch_size = batch_size or int(recipe.training.get("per_device_eval_batch_size", 8))
    max_length = recipe.training.get("max_length", 1024)
    model_spec = recipe.model.model_copy(update={"lora": None})
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code,
                               recipe.model.gguf_file)  # fmt: skip
    trained = trained_model_path(run_dir)
    model = load_model(model_spec, trainable=False)
    add_fused_lm_head(model)
    before = score_pairs(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length,
                         desc="Scoring held-out pairs (before)")  # fmt: skip
    after = None
    if trained is not None:
        if (trained / "adapter_config.json").exists():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(trained))  # its base already has the fused head
        else:
            del model
            model = load_model(model_spec.model_copy(update={"name_or_path": str(trained), "gguf_file": None}),
                               trainable=False)  # fmt: skip
            add_fused_lm_head(model)
        after = score_pairs(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length,
                            desc="Scoring held-out pairs (after)")  # fmt: skip
    return report_from_scores(before, after, recipe_beta(recipe), str(path))


def evaluate_diffusion(recipe, run_dir: Path, limit: int | None = None, batch_size: int | None = None) -> EvalReport:
    """:func:`evaluate` for a diffusion recipe: the held-out pairs' denoising scores
    (:meth:`~trl_plus.diffusion.trainer.DiffusionTrainer.pair_scores`, the same seeded draws for both models) of the
    recipe's pipeline ("before") and of the weights ``run_dir`` holds ("after": a LoRA, a fully trained denoiser, a
    method's added modules), through the trainer the recipe builds."""
    from ..diffusion.models import LORA_FILE, METHOD_WEIGHTS_FILE
    from ..diffusion.trainer import DiffusionTrainer
    from .validate import check_recipe, load_split

    method, training = check_recipe(recipe)
    rows = load_split(recipe, method, "eval")
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    trainer = DiffusionTrainer.from_recipe(recipe, method, {**training, "report_to": "none"}, eval_dataset=rows)
    if not trainer.are_pairs(trainer.eval_dataset):
        raise TrlPlusError(f"{recipe_source(recipe)}: data.eval: trl-plus eval scores pairs of images; "
                           f"{recipe.method}'s rows are not pairs")  # fmt: skip
    before = PairScores(trainer.pair_scores(batch_size=batch_size), None)
    after = None
    weights = [LORA_FILE, METHOD_WEIGHTS_FILE, "unet/config.json", "transformer/config.json"]
    if run_dir and any((Path(run_dir) / name).exists() for name in weights):
        trainer._load_from_checkpoint(str(run_dir))
        after = PairScores(trainer.pair_scores(batch_size=batch_size), None)
    return report_from_scores(before, after, recipe_beta(recipe), str(recipe.data.primary_eval.path))


# -- metrics (trl-plus eval --metric) ------------------------------------------------------------------------------


def locate_run(target: str | Path, overrides: list[str] | None = None):
    """``(recipe, trained model folder or None, its name)`` of a recipe file (its ``training.output_dir``'s model),
    a run directory (its final model) or a checkpoint folder inside one."""
    target = Path(target)
    if target.is_dir() and not (target / RESOLVED_RECIPE).is_file() and (target.parent / RESOLVED_RECIPE).is_file():
        return load_recipe(target.parent / RESOLVED_RECIPE, overrides), target, target.name  # a checkpoint
    recipe_file = target / RESOLVED_RECIPE if target.is_dir() else target
    if not recipe_file.is_file():
        raise TrlPlusError(f"{target}: not a recipe file, a run directory with {RESOLVED_RECIPE}, nor a checkpoint "
                           "folder inside one")  # fmt: skip
    recipe = load_recipe(recipe_file, overrides)
    run_dir = target if target.is_dir() else Path(recipe.training.get("output_dir", ""))
    if not target.is_dir():
        check_run_owner(run_dir, recipe.method, recipe.model)
    trained = trained_model_path(run_dir)
    return recipe, trained, "trained" if trained is not None else "untrained"


def metrics_report(results: dict) -> dict:
    """``{set: {metric: {"summary": {...}, "artefacts": [paths]}}}`` (``metrics_report.json``)."""
    return {set_name: {name: {"summary": r.summary, "artefacts": [str(p) for p in r.artefacts]}
                       for name, r in per_metric.items()} for set_name, per_metric in results.items()}  # fmt: skip


def metrics_table(results: dict) -> str:
    """A plain-text table of metric summaries: one block per data set and metric, one line per figure."""
    lines = []
    for set_name, per_metric in results.items():
        for name, result in per_metric.items():
            lines.append(f"{name} on {set_name}:")
            lines += [f"  {key:38} {value:.6g}" for key, value in result.summary.items()]
            lines += [f"  {'artefact':38} {path}" for path in result.artefacts]
    return "\n".join(lines)
