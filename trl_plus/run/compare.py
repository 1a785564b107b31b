"""``trl-plus compare RUN... [--data FILE]``: finished runs side by side on the same held-out pairs — one table and
one PNG (``compare.png``) — and ``trl-plus compare RECIPE --methods dpo,simpo --betas 0.1,0.5``, which trains each
method × β on that recipe first (the Hitchhiker's-guide study as one command).

Each run is evaluated as ``trl-plus eval`` evaluates it (``trl_plus.run.evaluate``: the model before training is
the reference), so a run's column reproduces its own ``eval_report.json``. The KL column is the mean log-ratio
``log πθ(y)/πref(y)`` over the held-out completions: a proxy (the KL proper is an expectation over the model's
own samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import load_recipe
from ..errors import TrlPlusError
from .evaluate import IMAGE_NOTE, EvalReport, evaluate
from .rundir import RESOLVED_RECIPE

#: The compared figures: key in the report's "after" column, label, format.
ROWS = (
    ("reward_accuracy", "implicit-reward accuracy (ties ½)", "{:.3f}"),
    ("reward_margin", "implicit-reward margin β·Δ", "{:+.4f}"),
    ("likelihood_accuracy", "likelihood ranking accuracy", "{:.3f}"),
    ("log_ratio", "KL proxy: mean log πθ/πref", "{:+.3f}"),
    ("logps/chosen", "mean log-prob, chosen", "{:.2f}"),
    ("logps/rejected", "mean log-prob, rejected", "{:.2f}"),
)


@dataclass
class Comparison:
    """The compared runs' reports, by run label."""

    reports: dict[str, EvalReport]
    source: str

    def table(self) -> str:
        """One row per figure, one column per run."""
        names = list(self.reports)
        width = max(12, *(len(n) + 2 for n in names))
        lengths = next(iter(self.reports.values())).lengths
        lines = [f"held-out pairs: {int(lengths['pairs'])} from {self.source} (reference = each run's model before "
                 "training)", f"{'':36}" + "".join(f"{n:>{width}}" for n in names)]  # fmt: skip
        images = "chosen_tokens" not in lengths  # a diffusion comparison: no lengths, small ℓ
        for key, label, fmt in ROWS:
            fmt = "{:.5f}" if images and key.startswith("logps/") else fmt
            cells = [fmt.format(r.after[key]) if r.after and key in r.after else "-" for r in self.reports.values()]
            if images and key == "normalized_likelihood_accuracy":
                continue
            lines.append(f"{label:36}" + "".join(f"{c:>{width}}" for c in cells))
        if images:
            lines.append(IMAGE_NOTE)
        else:
            lines.append(f"lengths: chosen {lengths['chosen_tokens']:.1f}, rejected {lengths['rejected_tokens']:.1f} "
                         "tokens on average (the same pairs for every run)")  # fmt: skip
        return "\n".join(lines)

    def plot(self, path: str | Path) -> str:
        """Bars per run: the two accuracies (chance 0.5 marked), the margin and the KL proxy."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.reports)
        after = [r.after or {} for r in self.reports.values()]
        panels = (("accuracy on held-out pairs", ("reward_accuracy", "likelihood_accuracy")),
                  ("implicit-reward margin β·Δ", ("reward_margin",)),
                  ("KL proxy: mean log πθ/πref", ("log_ratio",)))  # fmt: skip
        fig, axes = plt.subplots(1, 3, figsize=(4 + 1.6 * len(names) * 1.5, 3.6))
        for ax, (title, keys) in zip(axes, panels):
            width = 0.8 / len(keys)
            for j, key in enumerate(keys):
                xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
                label = next(lbl for k, lbl, _ in ROWS if k == key)
                ax.bar(xs, [a.get(key, 0.0) for a in after], width, label=label)
            if "reward_accuracy" in keys:
                ax.axhline(0.5, color="grey", lw=0.8, ls="--")
                ax.set_ylim(0, 1)
                ax.legend(fontsize=7, loc="lower right")
            else:
                ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
            ax.set_title(title, fontsize=9)
        fig.suptitle(f"{len(names)} runs on {Path(self.source).name}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path)


def run_label(run_dir: Path) -> str:
    """A column name for a run: its method and β (``dpo β=0.1``), else its folder name."""
    recipe = load_recipe(run_dir / RESOLVED_RECIPE)
    beta = recipe.method_args.get("beta")
    return f"{recipe.method} β={beta:g}" if isinstance(beta, (int, float)) else recipe.method


def compare_runs(runs: list[str], data: str | None = None, limit: int | None = None) -> Comparison:
    """Evaluate each finished run on the same held-out pairs (``data``, else the runs' common ``data.eval``)."""
    dirs = [Path(r) for r in runs]
    for d in dirs:
        if not (d / RESOLVED_RECIPE).is_file():
            raise TrlPlusError(f"{d}: not a run directory (no {RESOLVED_RECIPE}); compare finished `trl-plus train` "
                               "runs")  # fmt: skip
    if data is None:
        sources = {}
        for d in dirs:
            spec = load_recipe(d / RESOLVED_RECIPE).data.primary_eval
            sources[d] = None if spec is None else (spec.path, spec.split, spec.limit)
        if None in sources.values():
            missing = next(str(d) for d, s in sources.items() if s is None)
            raise TrlPlusError(f"{missing}: the run has no data.eval: pass --data FILE to compare on the same pairs")
        if len(set(sources.values())) > 1:
            shown = "; ".join(f"{d.name}: {s[0]}" + (f" (limit {s[2]})" if s[2] else "") for d, s in sources.items())
            raise TrlPlusError(f"the runs were evaluated on different data ({shown}): pass --data FILE to compare them "
                               "on the same pairs")  # fmt: skip
    reports, labels = {}, {}
    for d in dirs:
        label = run_label(d)
        label = label if label not in labels else f"{label} ({d.name})"
        labels[label] = d
        report = evaluate(d, data=data, limit=limit)
        if report.after is None:
            raise TrlPlusError(f"{d}: holds no trained model (was the run interrupted before saving?)")
        reports[label] = report
    return Comparison(reports, next(iter(reports.values())).source)


def train_grid(recipe: str, methods: list[str], betas: list[float] | None, out_dir: str,
               overrides: list[str] | None = None) -> list[str]:  # fmt: skip
    """Train each method (× each β) on ``recipe`` into ``out_dir/<method>-beta<β>``; returns the run folders. The
    recipe's ``method_args`` are replaced by the method's defaults (and β)."""
    from .train import train

    runs = []
    for method in methods:
        for beta in betas or [None]:
            name = method if beta is None else f"{method}-beta{beta:g}"
            run = str(Path(out_dir) / name)
            sets = [*(overrides or []), f"method={method}", "method_args={}", f"training.output_dir={run}",
                    "training.overwrite_output_dir=true"]
            if beta is not None:
                sets.append(f"method_args.beta={beta}")
            print(f"== training {name} -> {run}", flush=True)
            result = train(recipe, sets)
            if result.interrupted:
                raise KeyboardInterrupt
            runs.append(run)
    return runs
