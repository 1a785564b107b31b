"""The ``trl-plus`` command: list, plugins, show, new, validate, estimate, train, eval, report, merge.

``--help`` and ``list`` import neither torch nor transformers; ``train`` does, once the recipe is valid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import TrlPlusError, quiet_known_noise

LIST_WIDTH = 100  # `trl-plus list` fits this many columns unless --wide


def _table(rows: list[list[str]], header: list[str], notes: list[str] | None = None) -> str:
    """``rows`` under ``header``, each column as wide as its widest cell; a cell with line breaks continues on the
    next lines; ``notes`` (one for the header, then one per row) are printed indented under their row."""
    cells = [[str(cell).split("\n") for cell in row] for row in [header, *rows]]
    widths = [max(len(line) for row in cells for line in row[i]) for i in range(len(header))]

    def render(row: list[list[str]]) -> list[str]:
        return ["  ".join(f"{cell[k] if k < len(cell) else '':<{w}}" for cell, w in zip(row, widths)).rstrip()
                for k in range(max(map(len, row)))]  # fmt: skip

    blocks = [render(row) + ([f"  {notes[i]}"] if notes else []) for i, row in enumerate(cells)]
    blocks.insert(1, ["  ".join("-" * w for w in widths)])
    return "\n".join(line for block in blocks for line in block)


def _paper_line(paper, width: int | None = None) -> str:
    """``arXiv ID  title``, the title cut with an ellipsis to ``width`` characters (``None``: whole)."""
    line = f"{paper.where if paper.arxiv else (paper.venue or 'no arXiv')}  {paper.title}"
    return line if width is None or len(line) <= width else line[: width - 1].rstrip() + "…"


def _distribution(source: str) -> str:
    """``trl-plus-asft (asft)`` -> ``trl-plus-asft``; ``trl-plus (built-in)`` stays."""
    return source if source.endswith("(built-in)") else source.split(" (")[0]


def _missing_extra(cls) -> tuple[str, str] | None:
    """``(extra, install line)`` when the method's trainer kind needs an optional extra that is not installed (found
    without importing it)."""
    import importlib.util

    from .trainers import TRAINER_EXTRAS

    if cls.trainer not in TRAINER_EXTRAS:
        return None
    module, install = TRAINER_EXTRAS[cls.trainer]
    return None if importlib.util.find_spec(module) else (f"trl-plus[{cls.trainer}]", install)


def _needs(cls) -> str:
    """The needs column: the method's needs, and the optional extra it lacks."""
    missing = _missing_extra(cls)
    return cls.needs.describe() + (f", extra {missing[0]} (not installed)" if missing else "")


def cmd_list(args: argparse.Namespace) -> int:
    """``trl-plus list``: the methods (family, needs, source, paper), the model aliases and any broken plugin, in
    100 columns (``--wide``: one line per method, nothing cut)."""
    from .registry import get_registry

    registry = get_registry()
    if args.by:
        print(taxonomy_groups(registry, args.by))
        return 0
    if args.metrics or args.scorers or args.environments:
        kind = "metric" if args.metrics else "scorer" if args.scorers else "environment"
        table = {"metric": registry.metrics, "scorer": registry.scorers, "environment": registry.environments}[kind]
        rows = [[name, textwrap.fill(cls.summary, 60), _distribution(registry.component_sources[kind, name])]
                for name, cls in sorted(table.items())]  # fmt: skip
        header = [kind, "what it gives", "from"]
        if kind == "scorer":  # what a completion is: text, or a diffusion run's pixels / latents
            rows = [[row[0], getattr(table[row[0]], "inputs", "text"), *row[1:]] for row in rows]
            header = [kind, "reads", *header[1:]]
        print(_table(rows, header))
        return 0
    if args.json or args.markdown:
        from .run.catalogue import method_record, methods_markdown, ordered

        if args.markdown:
            print(methods_markdown(registry))
        else:
            print(json.dumps([method_record(cls, registry.sources[name]) for name, cls in ordered(registry)], indent=2))
        return 0
    methods = sorted(registry.methods.items())
    header = ["method", "family", "needs", "from"]
    if args.wide:
        rows = [[name, cls.family, _needs(cls), registry.sources[name], _paper_line(cls.paper)]
                for name, cls in methods]  # fmt: skip
        print(_table(rows, [*header, "paper"]))
    else:  # the paper on a line of its own under each method; needs wrapped; the distribution without its plugin
        rows = [[name, cls.family, textwrap.fill(_needs(cls), 26, break_on_hyphens=False),
                 _distribution(registry.sources[name])] for name, cls in methods]  # fmt: skip
        notes = ["paper", *(_paper_line(cls.paper, LIST_WIDTH - 2) for _, cls in methods)]
        print(_table(rows, header, notes))

    def say(text: str, indent: str) -> None:
        print(text if args.wide else textwrap.fill(text, LIST_WIDTH, subsequent_indent=indent))

    extras = {}
    for name, cls in methods:
        if (missing := _missing_extra(cls)) is not None:
            extras.setdefault(missing, []).append(name)
    for (extra, install), names in extras.items():
        print()
        say(f"{', '.join(names)} need the optional extra {extra}, not installed: {install}", "  ")
    if registry.aliases:
        print()
        say("model aliases: " + ", ".join(f"{a.name} ({a.description})" for a in registry.aliases.values()), "  ")
    if registry.broken:
        print("\nbroken plugins (not usable until fixed):")
        for b in registry.broken.values():
            say(f"  {b.name}: {b.source}: {b.error}", "    ")
            if args.debug:
                print(textwrap.indent(b.traceback, "    "))
    return 0


def taxonomy_groups(registry, key: str) -> str:
    """``trl-plus list --by KEY``: the methods grouped by their taxonomy tags under ``KEY`` (a method with several
    values is in several groups; untagged ones last)."""
    from .contract import TAXONOMY
    from .errors import did_you_mean

    if key not in TAXONOMY:
        raise TrlPlusError(f"--by {key}: not a taxonomy key{did_you_mean(key, TAXONOMY)}; keys: {', '.join(TAXONOMY)}")
    groups: dict[str, list[str]] = {value: [] for value in TAXONOMY[key]}
    untagged = []
    for name, cls in sorted(registry.methods.items()):
        values = cls.taxonomy.get(key)
        if values is None:
            untagged.append(name)
            continue
        for value in (values,) if isinstance(values, str) else values or ("— (explicitly none)",):
            groups.setdefault(value, []).append(name)
    lines = [f"{value} ({len(names)}): {', '.join(names)}" for value, names in groups.items() if names]
    if untagged:
        lines.append(f"not tagged under {key} ({len(untagged)}): {', '.join(untagged)}")
    return "\n".join(textwrap.fill(line, LIST_WIDTH, subsequent_indent="    ") for line in lines)


def example_recipe(method_cls) -> str:
    """A minimal recipe for ``method_cls`` that runs on the CPU with the tiny built-in model."""
    import yaml

    fields = method_cls.Config.model_fields.items()
    defaults = {k: f.default for k, f in fields if not f.is_required() and f.default is not None}
    recipe: dict[str, Any] = {"method": method_cls.name, **({"method_args": defaults} if defaults else {})}
    recipe |= {
        "model": dict(getattr(method_cls, "example_model", {"name_or_path": "tiny-llama"})),
        "data": {"train": dict(method_cls.example_data)},
        "training": {"output_dir": f"runs/{method_cls.name}", "max_steps": 20, "learning_rate": 1e-3},
    }
    if method_cls.needs.rollout is not None:  # an online method: what scores its samples (a rule scorer here)
        recipe["rollout"] = dict(getattr(method_cls, "example_rollout", {"scorers": [{"name": "digits"}]}))
    if method_cls.needs.teacher:
        recipe["teacher"] = {"name_or_path": "tiny-llama"}
    if method_cls.needs.teachers:  # each named teacher: here the tiny model itself (a real recipe names trained ones)
        recipe["teachers"] = {name: {"name_or_path": "tiny-llama"} for name in method_cls.needs.teachers}
    if method_cls.needs.policy_adapters:  # its named trainable adapters, each at the run's learning rate
        recipe["model"]["adapters"] = {name: {"r": 8, "lr_scale": 1.0} for name in method_cls.needs.policy_adapters}
    return yaml.safe_dump(recipe, sort_keys=False)


def cmd_show(args: argparse.Namespace) -> int:
    """``trl-plus show NAME``: paper, needs, data columns, hyperparameters and an example recipe."""
    from .registry import get_registry
    from .run.catalogue import method_record, type_name

    registry = get_registry()
    cls = registry.get(args.name)
    if args.json:
        print(json.dumps({**method_record(cls, registry.sources[cls.name]), "example_recipe": example_recipe(cls)},
                         indent=2))  # fmt: skip
        return 0
    print(f"{cls.name} — {cls.summary}" if cls.summary else cls.name)
    print(f"paper:   {cls.paper}" + (f"\ncode:    {cls.paper.code}" if cls.paper.code else ""))
    print(f"family:  {cls.family}\nneeds:   {cls.needs.describe()}\nfrom:    {registry.sources[cls.name]}")
    k = cls.sequences_per_example
    per_example = "a varying number of sequences" if k is None else f"{k} sequence{'s' if k > 1 else ''}"
    print(f"data:    columns {', '.join(cls.required_columns())}; {per_example} per example\n")
    rows = []
    for name, f in cls.Config.model_fields.items():
        annotation = type_name(f.annotation)
        default = "(required)" if f.is_required() else repr(f.default)
        rows.append([name, annotation, default, f.description or ""])
    print(_table(rows, ["hyperparameter", "type", "default", "meaning"]) if rows else "no hyperparameters")
    print("\nexample recipe:\n" + textwrap.indent(example_recipe(cls), "  "))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """``trl-plus plugins``: the installed plugin distributions, their versions and what each registers."""
    from .registry import get_registry
    from .run.catalogue import plugin_records

    records = plugin_records(get_registry())
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    rows = [[r["distribution"], r["version"] or "?", ", ".join(
        r["methods"] + r["model_aliases"] + [f"`trl-plus {c}`" for c in r["commands"]]) or f"broken: {r['error']}"]
        for r in records]  # fmt: skip
    print(_table(rows, ["distribution", "version", "registers"]))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """``trl-plus validate RECIPE``: everything ``train`` checks before loading a model, data columns included."""
    from .config import load_recipe

    recipe = load_recipe(args.recipe, args.set)  # the schema first: a typo is reported before anything heavy loads
    from .run.validate import check_lengths, check_recipe, load_split, plan_stages

    method, training = check_recipe(recipe)
    datasets = {split: load_split(recipe, method, split) for split in ("train", "eval")}
    stages = plan_stages(recipe, method, datasets["train"])
    try:
        warnings = check_lengths(recipe, method, training, datasets)
    except TrlPlusError as exc:
        if "cannot load a tokenizer" not in str(exc):
            raise
        warnings = [f"{args.recipe}: token lengths not checked: the tokenizer of {recipe.model.name_or_path} is not "
                    "on this machine yet (the first train downloads it)"]  # fmt: skip
    model = recipe.model
    if model.uses_lora and model.kind != "diffusion":  # module names from the config (meta device)
        from .models.load import check_lora_targets, resolve_model_path

        try:
            check_lora_targets(model, resolve_model_path(model.name_or_path, model.gguf_file))
        except TrlPlusError as exc:
            raise TrlPlusError(f"{args.recipe}: {exc}") from None
    for line in warnings:
        print(f"warning: {line}")
    staged = f", stages {', '.join(s.name for s in stages)}" if stages else ""
    print(f"{args.recipe}: ok (method {method.name}, {len(training)} training keys{staged})")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """``trl-plus estimate RECIPE``: the predicted peak accelerator memory, line by line, and which cards it fits
    (from the model's config alone: no weights load)."""
    from .config import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    from .run.estimate import estimate

    result = estimate(recipe, sequences=args.sequences, prompt_tokens=args.prompt_tokens)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``trl-plus train RECIPE``: train, then print the closing summary (exit 130 when interrupted)."""
    from .config import load_recipe
    from .run.validate import check_recipe

    recipe = load_recipe(args.recipe, args.set)
    check_recipe(recipe)  # a typo is reported before torch loads (run.train imports it)
    from .run.train import train

    result = train(recipe)
    if result.is_main_process:
        print(result.summary())
    return 130 if result.interrupted else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``trl-plus eval TARGET``: held-out pair metrics before (and after) training, as a table; with ``--metric``
    (or a recipe with ``metrics:``... given by name), the named metrics on the target's model."""
    if args.metric:
        from .run.evaluate import metrics_report, metrics_table
        from .run.metrics import evaluate_metrics

        names = [n.strip() for n in args.metric.split(",") if n.strip()]
        results = evaluate_metrics(args.target, names, data=args.data, limit=args.limit, overrides=args.set,
                                   out_dir=args.out)  # fmt: skip
        print(metrics_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(metrics_report(results), indent=2))
        return 0
    from .run.evaluate import evaluate

    if args.data == "train":
        raise TrlPlusError("--data train: the before/after table is for held-out pairs; use it with --metric NAME")
    report = evaluate(args.target, data=args.data, limit=args.limit, batch_size=args.batch_size, overrides=args.set)
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """``trl-plus score FILE --scorer NAME --out FILE``: a scorer's scores of every completion as new columns."""
    from .run.score import score_file

    out, columns, rows = score_file(args.file, args.scorer, args.out, model=args.model, column=args.column,
                                    as_list=args.list, limit=args.limit)  # fmt: skip
    print(f"{rows} rows scored by {args.scorer.split(':')[0]}: columns {', '.join(columns)} -> {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``trl-plus compare RUN...``: runs side by side on the same held-out pairs (a table and a PNG)."""
    from .run.compare import compare_runs, train_grid

    runs = args.runs
    if args.methods:
        if len(runs) != 1:
            raise TrlPlusError("--methods trains each method on one recipe: give one RECIPE, e.g. "
                               "`trl-plus compare recipe.yaml --methods dpo,simpo --betas 0.1,0.5`")  # fmt: skip
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        try:
            betas = [float(b) for b in args.betas.split(",")] if args.betas else None
        except ValueError:
            raise TrlPlusError(f"--betas {args.betas}: expected numbers separated by commas, e.g. 0.1,0.5") from None
        runs = train_grid(runs[0], methods, betas, args.out or "runs/compare", overrides=args.set)
    elif args.betas:
        raise TrlPlusError("--betas goes with --methods (it trains each method at each β)")
    comparison = compare_runs(runs, data=args.data, limit=args.limit)
    print(comparison.table())
    png = Path(args.png or Path(args.out or runs[0]).parent / "compare.png")
    print(f"\nplot: {comparison.plot(png)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``trl-plus report RUN_DIR``: write the training-curves PNG of a run."""
    from .run.report import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``trl-plus merge RUN_DIR``: merge a LoRA run's adapter into its base model (a second stage's start)."""
    from .run.merge import merge_adapter

    print(merge_adapter(args.run_dir, args.output))
    return 0


# -- generate ---------------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    """``trl-plus generate RUN_DIR --prompt ...``: completions from a finished run's model (``--weights``: the
    method's mixing, e.g. MAH-DPO's heads)."""
    from .run.generate import generate

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise TrlPlusError(f"--weights: expected numbers separated by commas (e.g. 0.7,0.3), got "
                               f"{args.weights!r}") from None  # fmt: skip
    scorers = [named_scorer(spec) for spec in args.scorer or ()]  # before any model loads
    texts = generate(args.run_dir, args.prompt, weights, args.max_new_tokens, args.adapter, args.sample, scorers)
    scores = [scorer.score(args.prompt, texts) for scorer in scorers]
    for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
        print(f"{prompt}{text}" if len(args.prompt) == 1 else f"--- {prompt}\n{text}")
        if scorers:
            figures = [f"{name} {float(value):g}" for scorer, values in zip(scorers, scores)
                       for name, value in zip(scorer.outputs, values[i].reshape(-1).tolist())]  # fmt: skip
            print(f"[{'  '.join(figures)}]")
    return 0


def named_scorer(spec: str):
    """``--scorer NAME`` or ``NAME:key=value,key=value`` (values read as YAML): the scorer, checked in one line."""
    import yaml
    from pydantic import ValidationError

    from .registry import get_registry

    name, _, rest = spec.partition(":")
    cls = get_registry().get_scorer(name.strip())
    args = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise TrlPlusError(f"--scorer {spec}: expected NAME:key=value,..., got {item!r}")
        args[key.strip()] = yaml.safe_load(value)
    try:
        scorer = cls(cls.Config(**args))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise TrlPlusError(f"--scorer {name}: {where}: {first['msg']}") from None
    if scorer.columns:
        raise TrlPlusError(f"--scorer {name}: reads the data column(s) {', '.join(scorer.columns)}, which a prompt "
                           "given on the command line lacks")  # fmt: skip
    return scorer


def add_generate(sub, common: argparse.ArgumentParser) -> None:
    """The ``generate`` subcommand's parser."""
    p = sub.add_parser("generate", parents=[common], help="generate from a finished run's model (greedy by default)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--weights", help="the method's mixing weights, e.g. 0.7,0.3 (mah-dpo: its heads' logits)")
    p.add_argument("--adapter", help="of a run with several named adapters, the one to generate with")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--scorer", action="append", metavar="NAME[:key=value,...]",
                   help="score each completion, e.g. --scorer digits --scorer keyword:keyword=apple (repeatable; "
                        "trl-plus list --scorers)")  # fmt: skip
    p.set_defaults(func=cmd_generate)


def cmd_new(args: argparse.Namespace) -> int:
    """``trl-plus new NAME``: scaffold a method plugin (``plugins/NAME/``, ``recipes/NAME.yaml``) to fill in."""
    from .run.scaffold import next_steps, scaffold

    options = {"family": args.family, "reference_free": args.reference_free}
    for path in scaffold(args.name, args.root, **options):
        print(f"wrote {path}")
    print(next_steps(args.name, args.root, **options))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``trl-plus`` command."""
    parser = argparse.ArgumentParser(
        prog="trl-plus",
        description="Preference optimization methods from the literature as plugins of one TRL trainer.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"trl-plus {__version__}")
    common = argparse.ArgumentParser(add_help=False)  # --debug is accepted after the command too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                      help="override recipe values, e.g. --set training.max_steps=10 model.dtype=float32 "
                           "(repeatable)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", parents=[common],
                       help="installed methods: family, needs, paper, source; broken plugins")  # fmt: skip
    p.add_argument("--wide", action="store_true",
                   help=f"one line per method, nothing cut (default: {LIST_WIDTH} columns)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="every method's record (paper, needs, hyperparameters) as JSON")
    p.add_argument("--markdown", action="store_true", help="the methods table of the README, in Markdown")
    p.add_argument("--by", metavar="KEY", help="group the methods by a taxonomy key (data.feedback, "
                   "constraint.reference, property, ...: the survey's vocabulary)")
    p.add_argument("--metrics", action="store_true", help="the metrics (trl-plus eval --metric, recipe metrics:)")
    p.add_argument("--scorers", action="store_true", help="the scorers (trl-plus score --scorer)")
    p.add_argument("--environments", action="store_true",
                   help="the multi-turn environments (recipe rollout.environment)")  # fmt: skip
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("plugins", parents=[common],
                       help="installed plugin distributions, versions, what each registers")  # fmt: skip
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("show", parents=[common],
                       help="a method's hyperparameters, data fields and an example recipe")  # fmt: skip
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="the method's record and example recipe as JSON")
    p.set_defaults(func=cmd_show)
    for name, func, text in (
        ("validate", cmd_validate, "check a recipe (keys, types, method args, files, data columns)"),
        ("train", cmd_train, "train as a recipe says (works under `accelerate launch -m trl_plus`)"),
    ):
        p = sub.add_parser(name, parents=[common, sets], help=text)
        p.add_argument("recipe", help="path to a YAML recipe")
        p.set_defaults(func=func)
    p = sub.add_parser("estimate", parents=[common, sets],
                       help="predict peak GPU memory (weights, LoRA, optimiser, activations) and which cards fit")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--sequences", type=int, metavar="K", help="sequences per example for a method whose K varies "
                   "(default 8)")  # fmt: skip
    p.add_argument("--prompt-tokens", type=int, default=0, metavar="P",
                   help="with training.prefix_sharing: the shared prompt's tokens (default 0: the worst case)")
    p.add_argument("--json", action="store_true", help="the breakdown as JSON")
    p.set_defaults(func=cmd_estimate)
    p = sub.add_parser("eval", parents=[common, sets],
                       help="held-out pairs: reward and likelihood ranking accuracy, margin, lengths")  # fmt: skip
    p.add_argument("target", metavar="TARGET", help="a recipe, the output_dir of a finished run, or a checkpoint "
                   "folder in one")
    p.add_argument("--metric", metavar="NAME[,NAME]", help="run these metrics (trl-plus list --metrics) instead of "
                   "the before/after table")
    p.add_argument("--data", help="pairs file (default: the recipe's data.eval); with --metric, `train` for the "
                   "training data")
    p.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    p.add_argument("--batch-size", type=int, help="pairs per forward pass (default: per_device_eval_batch_size or 8)")
    p.add_argument("--out", metavar="DIR", help="with --metric: where artefacts go (default: RUN/metrics/eval-*)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", parents=[common],
                       help="score every completion of a data file with a scorer; write the scores as columns")
    p.add_argument("file", metavar="FILE", help="a data file (jsonl, json, csv, parquet) with chosen/rejected or "
                   "completion")
    p.add_argument("--scorer", required=True, metavar="NAME[:k=v,...]",
                   help="e.g. length, length:scale=-1, implicit-reward:adapter=DIR (trl-plus list --scorers)")
    p.add_argument("--out", required=True, metavar="FILE", help="the scored rows, as JSON lines")
    p.add_argument("--model", metavar="MODEL", help="the tokenizer to count tokens with (name, alias or folder)")
    p.add_argument("--column", metavar="NAME", help="columns <side>_NAME (default: the scorer's output name)")
    p.add_argument("--list", action="store_true", help="append to list columns (MODPO's <side>_margin_rewards)")
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("compare", parents=[common, sets],
                       help="runs side by side on the same held-out pairs: a table and a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished run directories (or one RECIPE with --methods)")
    p.add_argument("--methods", metavar="A,B", help="train each of these methods on the one RECIPE first")
    p.add_argument("--betas", metavar="B1,B2", help="with --methods: train each method at each β")
    p.add_argument("--out", metavar="DIR", help="with --methods: where the runs go (default: runs/compare)")
    p.add_argument("--data", help="held-out pairs file (default: the runs' common data.eval)")
    p.add_argument("--limit", type=int, help="compare on the first N pairs")
    p.add_argument("--png", metavar="FILE", help="the plot (default: compare.png beside the runs)")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("report", parents=[common], help="write the training-curves PNG of a run directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--output", help="PNG path (default: RUN_DIR/training_curves.png)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("merge", parents=[common],
                       help="merge a LoRA run's adapter into its base model (e.g. before a second stage)")  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--output", help="output directory (default: RUN_DIR-merged)")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("new", parents=[common],
                       help="scaffold a method plugin: plugins/NAME/ (module, tests, README) and recipes/NAME.yaml")
    p.add_argument("name", metavar="NAME", help="the method's name: lowercase letters, digits and dashes")
    p.add_argument("--family", default="offline-pairwise", help="the method's family (default: offline-pairwise)")
    p.add_argument("--reference-free", action="store_true", help="the method needs no reference model")
    p.add_argument("--root", default=".", metavar="DIR", help="the repository root to write into (default: .)")
    p.set_defaults(func=cmd_new)
    add_generate(sub, common)
    _add_plugin_commands(sub, common)
    return parser


def _add_plugin_commands(sub, common: argparse.ArgumentParser) -> None:
    """The installed plugins' commands (the ``register_commands`` hook): ``trl-plus sail localize ...``; two-word
    commands share a group parser per first word. A plugin that fails to import adds none (``trl-plus list`` names
    it)."""
    from .registry import get_registry

    groups: dict[str, Any] = {}
    for name, command in sorted(get_registry().commands.items()):
        words = name.split()
        if len(words) == 1:
            parser = sub.add_parser(name, parents=[common], help=f"{command.help} [{_distribution(command.source)}]")
        else:
            if words[0] not in groups:
                group = sub.add_parser(words[0], parents=[common], help=f"{words[0]} plugin commands: "
                                       + ", ".join(w.split()[1] for w in get_registry().commands
                                                   if w.split()[0] == words[0]))  # fmt: skip
                groups[words[0]] = group.add_subparsers(dest="plugin_command", required=True, metavar="COMMAND")
            parser = groups[words[0]].add_parser(words[1], parents=[common], help=command.help)
        command.add_arguments(parser)
        parser.set_defaults(func=command.run)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command; user errors print one line (``--debug`` for the traceback) and exit 2; a closed
    output pipe ends it quietly (141)."""
    args = build_parser().parse_args(argv)
    quiet_known_noise()  # third-party log lines a user cannot act on (trl_plus.errors.KNOWN_NOISE)
    debug = args.debug or os.environ.get("TRL_PLUS_DEBUG") == "1"
    try:
        return args.func(args)
    except TrlPlusError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of a pipe left early (`trl-plus list | head -3`): stop without a word
        with contextlib.suppress(AttributeError, OSError):  # nor fail again when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command whose pipe closed
    finally:
        end_process_group()


def end_process_group() -> None:
    """Under ``accelerate launch``: destroy the process group before Python exits. Left to interpreter shutdown,
    gloo's worker threads can be torn down while joinable and abort a finished run ("terminate called without an
    active exception", exit -6; seen once in CI on a loaded 2-core machine)."""
    torch = sys.modules.get("torch")  # a command that never imported torch (``trl-plus list``) has nothing to end
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
