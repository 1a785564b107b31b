"""Step time of PlusTrainer against TRL's own DPOTrainer, in one process, on the same model and batches.

A benchmark, not a test: it prints median milliseconds per optimiser step and three ratios.

  1. PlusTrainer `dpo` / trl.DPOTrainer (loss_type sigmoid)             target <= 1.03
  2. PlusTrainer `simpo` (reference-free) / PlusTrainer `dpo`           target <= 0.80
  3. PlusTrainer `dpo`, reference precomputed / `dpo`, live reference   target <= 0.80

Setup: one random Llama (trl_plus.models.tiny.build_model, char tokenizer so 1 character = 1 token) saved to a temporary
directory whose path is given to every trainer, so TRL and PlusTrainer both load the DPO reference (a second, frozen
full copy: no LoRA) the same way. Every configuration gets the same DPOConfig (fp32, no gradient checkpointing, same
seed) and the same rows; every row has the same length, so every batch is [2 x batch, seq_len] in every run.

Timing: a callback takes time.perf_counter() at on_step_begin and on_step_end. "step" = begin -> end (forward,
reference, loss, backward, optimiser step: what the ratios use). "cycle" = end -> next end (adds fetching and
collating the next batch, and logging): shown for information, since a precomputed reference is read and collated
there. The first --warmup steps of each run are dropped. Runs are interleaved over --repeats in a Williams Latin
square (over each 4 repeats every configuration runs once in each position and once right after each other one) so
machine noise and carry-over hit every configuration alike; each ratio also shows its range over the repeats. Building
the trainer (loading the models, tokenising, and for `precomputed` the one reference pass over the data, also shown
alone as "precompute s") is reported as "build s", never counted in step time.

    python bench/bench_step_time.py                 # hidden 256, 4 layers, 256 tokens, 4 pairs/step (~3 min, 2 cores)
    python bench/bench_step_time.py --quick         # smoke run in seconds
    python bench/bench_step_time.py --json out.json # also write the results as JSON
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import datasets
import torch
import transformers
from accelerate.utils import tqdm as accelerate_tqdm
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

import trl_plus
import trl_plus.trainers.preference as trl_plus_trainer
from trl_plus import LossContext, LossOutput, Method, Needs, Paper
from trl_plus.models.tiny import build_model, build_tokenizer
from trl_plus.trainers.preference import PlusTrainer

CONFIGS = ("trl", "dpo", "simpo", "precomputed")
LABELS = {
    "trl": "trl.DPOTrainer (sigmoid)",
    "dpo": "PlusTrainer dpo (live reference)",
    "simpo": "PlusTrainer simpo (no reference)",
    "precomputed": "PlusTrainer dpo (precomputed ref)",
}
RATIOS = {  # name: (numerator, denominator, target)
    "dpo / trl": ("dpo", "trl", 1.03),
    "simpo / dpo": ("simpo", "dpo", 0.80),
    "precomputed / dpo": ("precomputed", "dpo", 0.80),
}


# -- SimPO fallback ------------------------------------------------------------------------------------------------
class InlineSimPO(Method):
    """BENCH-ONLY FALLBACK, used only when the `simpo` plugin is not registered: a minimal reference-free SimPO loss
    (length-averaged log-likelihood reward, beta 2.0, gamma/beta 0.25). Same cost profile as the plugin: one policy
    forward, no reference."""

    name = "simpo-inline-bench"
    paper = Paper("SimPO: Simple Preference Optimization with a Reference-Free Reward", "2405.14734")
    summary = "bench-only inline SimPO fallback"
    needs = Needs(reference="no")

    def loss(self, ctx: LossContext) -> LossOutput:
        import torch.nn.functional as F

        rewards = ctx.mean_logps()
        losses = -F.logsigmoid(2.0 * (rewards[0] - rewards[1] - 0.25))
        return LossOutput(loss=losses.mean(), rewards=2.0 * rewards.detach())


def simpo_method(force_inline: bool = False):
    """``("simpo", label)`` if the plugin is registered, else the inline fallback class and a label saying so."""
    if force_inline:
        return InlineSimPO, "INLINE FALLBACK InlineSimPO in bench/bench_step_time.py (forced by --inline-simpo)"
    if "simpo" in trl_plus.get_registry().methods:
        return "simpo", "plugin trl_plus_simpo (registered)"
    return InlineSimPO, "INLINE FALLBACK InlineSimPO in bench/bench_step_time.py (plugin `simpo` not registered)"


# -- timing --------------------------------------------------------------------------------------------------------
class StepTimer(TrainerCallback):
    """Wall time of each optimiser step (begin -> end) and of each step-to-step cycle (end -> end)."""

    def __init__(self):
        self.steps, self.cycles = [], []
        self._begin = self._last_end = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_end = time.perf_counter()  # so cycle 1 = first fetch + step (dropped with the warm-up anyway)

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.steps.append(now - self._begin)
        self.cycles.append(now - self._last_end)
        self._last_end = now


# -- data ----------------------------------------------------------------------------------------------------------
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box and judge each quiz".split()


def _text(seed: int, length: int) -> str:
    out, i = "", seed
    while len(out) < length:
        out += WORDS[i % len(WORDS)] + " "
        i += 7
    return out[:length]


def make_rows(n: int, seq_len: int) -> list[dict[str, str]]:
    """``n`` pairs whose tokenized prompt + chosen (+ EOS) is exactly ``seq_len`` tokens (the rejected one is 10
    shorter, so batches carry some padding); a char tokenizer, so characters = tokens."""
    prompt_len = seq_len // 3
    rows = []
    for i in range(n):
        prompt = _text(3 * i, prompt_len - 1) + "?"
        chosen = _text(3 * i + 1, seq_len - prompt_len - 1)  # the trainers append EOS: +1 token
        rejected = _text(3 * i + 2, seq_len - prompt_len - 11)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# -- one run -------------------------------------------------------------------------------------------------------
class TimedPlusTrainer(PlusTrainer):
    """PlusTrainer that records how long its reference precompute (run inside ``__init__``) takes; nothing else
    changes (used for all three PlusTrainer configurations)."""

    precompute_seconds: float | None = None

    def _precompute_ref_logps(self, dataset, name, batch_size):
        start = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        type(self).precompute_seconds = time.perf_counter() - start
        return out


def run_once(name: str, model_dir: str, tokenizer, rows, args_kwargs: dict, max_steps: int, simpo) -> dict:
    """Build configuration ``name``, train ``max_steps`` steps; return its step/cycle times, build and precompute
    time, and whether a reference model is held in memory during training."""
    args = DPOConfig(max_steps=max_steps, **args_kwargs)
    dataset = Dataset.from_list(rows)  # a fresh fingerprint: the precompute is really done in every build
    timer = StepTimer()
    start = time.perf_counter()
    if name == "trl":
        trainer = DPOTrainer(
            model_dir, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
        )
        assert trainer.loss_types == ["sigmoid"] and not trainer.precompute_ref_logps
    else:
        method, mode = {"dpo": ("dpo", "model"), "simpo": (simpo, "none"), "precomputed": ("dpo", "precomputed")}[name]
        TimedPlusTrainer.precompute_seconds = None
        trainer = TimedPlusTrainer(
            model_dir, args=args, method=method, reference_mode=mode, train_dataset=dataset,
            processing_class=tokenizer, callbacks=[timer],
        )  # fmt: skip
        assert trainer.reference_mode == mode, (trainer.reference_mode, mode)
    build = time.perf_counter() - start
    precompute = TimedPlusTrainer.precompute_seconds if name == "precomputed" else None
    trainer.remove_callback(PrinterCallback)
    has_ref = trainer.ref_model is not None
    trainer.train()
    assert trainer.state.global_step == max_steps, (name, trainer.state.global_step)
    del trainer
    gc.collect()
    return {"steps": timer.steps, "cycles": timer.cycles, "build": build, "precompute": precompute,
            "ref_model_in_memory": has_ref}  # fmt: skip


def check_and_warm_up(model_dir, tokenizer, rows, args_kwargs, batch_size, seq_len) -> tuple[int, int]:
    """Collate one batch the way PlusTrainer does (every row has one length, so every batch of every run has this
    shape), then train 2 untimed steps so the process's one-off start-up costs land on no configuration."""
    trainer = PlusTrainer(
        model_dir, args=DPOConfig(max_steps=2, **args_kwargs), method="dpo", reference_mode="model",
        train_dataset=Dataset.from_list(rows[: 2 * batch_size]), processing_class=tokenizer,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    shape = tuple(batch["input_ids"].shape)
    lengths = {len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in trainer.train_dataset}
    del trainer
    gc.collect()
    if shape != (2 * batch_size, seq_len) or lengths != {seq_len}:
        print(f"WARNING: batch shape {shape}, prompt+chosen lengths {lengths}; expected ({2 * batch_size}, {seq_len})")
    return shape


# -- main ----------------------------------------------------------------------------------------------------------
def run_orders(n: int) -> list[list[int]]:
    """A Williams Latin square for ``n`` (even) configurations: over ``n`` repeats every configuration runs once in
    every position and directly after every other configuration exactly once, so neither a position nor the run
    before it favours one configuration (a run is measurably affected by what ran just before it in the process)."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    return [[(c + r) % n for c in first] for r in range(n)]


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run (default 2)")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved runs per configuration (default 12)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens of prompt + chosen = max_length (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke configuration (flags given explicitly still win): 4 steps, 1 warm-up, 2 repeats, hidden 64, "
        "2 layers, 64 tokens",
    )  # fmt: skip
    parser.add_argument("--inline-simpo", action="store_true", help="use the bench's inline SimPO even if registered")
    parser.add_argument("--json", help="also write the results to this file")
    if parser.parse_args(argv).quick:
        parser.set_defaults(steps=4, warmup=1, repeats=2, hidden=64, layers=2, seq_len=64)
    opts = parser.parse_args(argv)
    threads = opts.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    # PlusTrainer's precompute progress bar ignores disable_tqdm and TQDM_DISABLE (accelerate's tqdm wrapper passes
    # disable=False explicitly); silence it here. Display only: it runs at construction, outside step time.
    trl_plus_trainer.tqdm = functools.partial(accelerate_tqdm, disable=True)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    wall_start = time.perf_counter()
    tokenizer = build_tokenizer()
    workdir = tempfile.mkdtemp(prefix="trl-plus-bench-")
    model_dir = os.path.join(workdir, "model")
    build_model(tokenizer, hidden_size=opts.hidden, num_layers=opts.layers).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    max_steps = opts.warmup + opts.steps
    rows = make_rows(max_steps * opts.batch_size, opts.seq_len)  # exactly one epoch: every row trained once
    args_kwargs = dict(
        output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=opts.batch_size,
        max_length=opts.seq_len, learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"], bf16=False, fp16=False,
        gradient_checkpointing=False, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=max_steps, disable_tqdm=True, dataloader_pin_memory=False, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    simpo, simpo_label = simpo_method(opts.inline_simpo)

    print(f"trl-plus bench: python {platform.python_version()}, torch {torch.__version__}, "
          f"trl {sys.modules['trl'].__version__}, transformers {sys.modules['transformers'].__version__}")  # fmt: skip
    print(f"torch threads {torch.get_num_threads()} (cores {os.cpu_count()}), fp32, hidden {opts.hidden}, "
          f"layers {opts.layers}, seq_len {opts.seq_len}, batch {opts.batch_size} pairs, "
          f"{opts.warmup} warm-up + {opts.steps} timed steps x {opts.repeats} repeats per configuration")  # fmt: skip
    print(f"simpo: {simpo_label}")
    shape = check_and_warm_up(model_dir, tokenizer, rows, args_kwargs, opts.batch_size, opts.seq_len)
    print(f"batch input_ids shape {list(shape)} in every step")

    results = {n: {"steps": [], "cycles": [], "run_medians": [], "build": [], "precompute": []} for n in CONFIGS}
    orders = run_orders(len(CONFIGS))
    for repeat in range(opts.repeats):
        order = [CONFIGS[i] for i in orders[repeat % len(orders)]]
        for name in order:
            out = run_once(name, model_dir, tokenizer, rows, args_kwargs, max_steps, simpo)
            r = results[name]
            r["steps"] += out["steps"][opts.warmup :]
            r["cycles"] += out["cycles"][opts.warmup :]
            r["run_medians"].append(statistics.median(out["steps"][opts.warmup :]))
            r["build"].append(out["build"])
            r["precompute"].append(out["precompute"])
            r["ref_model_in_memory"] = out["ref_model_in_memory"]
        line = "  ".join(f"{n} {1000 * results[n]['run_medians'][-1]:.1f}" for n in order)
        print(f"  repeat {repeat + 1}/{opts.repeats}: median step ms  {line}", flush=True)

    summary = {}
    for n in CONFIGS:
        r = results[n]
        summary[n] = {
            "label": LABELS[n],
            "median_step_ms": 1000 * statistics.median(r["steps"]),
            "p25_step_ms": 1000 * quantile(r["steps"], 0.25),
            "p75_step_ms": 1000 * quantile(r["steps"], 0.75),
            "median_cycle_ms": 1000 * statistics.median(r["cycles"]),
            "median_build_s": statistics.median(r["build"]),
            "median_precompute_s": statistics.median(r["precompute"]) if r["precompute"][0] is not None else None,
            "ref_model_in_memory": r["ref_model_in_memory"],
            "run_median_step_ms": [1000 * t for t in r["run_medians"]],
            "step_ms": [1000 * t for t in r["steps"]],
            "build_s": r["build"],
        }
    ratios = {}
    for key, (num, den, target) in RATIOS.items():
        value = summary[num]["median_step_ms"] / summary[den]["median_step_ms"]
        cycle = summary[num]["median_cycle_ms"] / summary[den]["median_cycle_ms"]
        per_repeat = [a / b for a, b in zip(results[num]["run_medians"], results[den]["run_medians"])]
        ratios[key] = {"value": value, "target": target, "pass": value <= target, "cycle_value": cycle,
                       "per_repeat": per_repeat}  # fmt: skip

    print(f"\n{'configuration':<35}{'step ms':>9}{'p25-p75':>15}{'cycle ms':>10}{'build s':>9}{'precompute s':>14}")
    for n in CONFIGS:
        s = summary[n]
        iqr = f"{s['p25_step_ms']:.1f}-{s['p75_step_ms']:.1f}"
        pre = "-" if s["median_precompute_s"] is None else f"{s['median_precompute_s']:.2f}"
        print(f"{s['label']:<35}{s['median_step_ms']:>9.1f}{iqr:>15}{s['median_cycle_ms']:>10.1f}"
              f"{s['median_build_s']:>9.2f}{pre:>14}")  # fmt: skip
    print(f"(median over {opts.repeats} x {opts.steps} timed steps; the reference pass over {len(rows)} pairs is in "
          "'build s' and 'precompute s', never in step time)")  # fmt: skip
    print(f"\n{'ratio of median step time':<26}{'value':>7}   {'target':<9}{'verdict':<9}{'per-repeat range':>17}"
          f"{'cycle ratio':>13}")  # fmt: skip
    for key, r in ratios.items():
        verdict = "PASS" if r["pass"] else "MISS"
        spread = f"{min(r['per_repeat']):.3f}-{max(r['per_repeat']):.3f}"
        print(f"{key:<26}{r['value']:>7.3f}   <= {r['target']:.2f}  {verdict:<9}{spread:>17}{r['cycle_value']:>13.3f}")
    wall = time.perf_counter() - wall_start
    print(f"\ntotal wall time {wall:.0f} s")

    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(
                {"options": {**vars(opts), "threads": torch.get_num_threads()}, "simpo": simpo_label,
                 "versions": {"torch": torch.__version__, "trl": sys.modules["trl"].__version__,
                              "transformers": sys.modules["transformers"].__version__},
                 "batch_shape": list(shape), "configurations": summary, "ratios": ratios, "wall_s": wall},
                f, indent=2,
            )  # fmt: skip
        print(f"wrote {opts.json}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
