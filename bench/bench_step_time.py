"""Step time of PlusTrainer against TRL's own DPOTrainer, in one process, on the same model and batches.

Prints three ratios (median seconds per optimiser step after warm-up):
  1. PlusTrainer `dpo` / trl.DPOTrainer (sigmoid)                   target <= 1.03
  2. PlusTrainer `simpo` (reference-free) / PlusTrainer `dpo`         target <= 0.80
  3. PlusTrainer `dpo`, reference precomputed / `dpo`, live reference target <= 0.80

Full fine-tuning, so DPO's reference is a second frozen model (loaded from the same saved directory by both
trainers). Runs are interleaved over repeats so machine noise hits every configuration alike. Precomputing the
reference log-probs happens when the trainer is built and is reported separately, not counted in step time.

    python bench/bench_step_time.py            # hidden 256, 4 layers, 256 tokens, batch 4 (a few minutes on 2 cores)
    python bench/bench_step_time.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from trl_plus.tiny import build_model, build_tokenizer
from trl_plus.trainer import PlusTrainer

TARGETS = {"dpo / trl": 1.03, "simpo / dpo": 0.80, "precomputed / dpo": 0.80}


class StepTimer(TrainerCallback):
    """Wall time of each optimiser step."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def make_rows(n: int, seq_len: int) -> list[dict[str, str]]:
    """Pairs whose prompt + completion is about ``seq_len`` characters (= tokens: the tokenizer is per char)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards box and judge each quiz".split()
    rows = []
    for i in range(n):
        def text(k, length):
            out = []
            while sum(len(w) + 1 for w in out) < length:
                out.append(words[(i * 7 + k * 3 + len(out)) % len(words)])
            return " ".join(out)[:length]

        prompt_len = seq_len // 3
        rows.append({"prompt": text(0, prompt_len) + "?", "chosen": text(1, seq_len - prompt_len - 2),
                     "rejected": text(2, seq_len - prompt_len - 12)})  # fmt: skip
    return rows


def run(name, model_dir, tokenizer, dataset, args_kwargs, steps):
    """Train ``steps`` steps of configuration ``name``; return (step times, build seconds)."""
    args = DPOConfig(max_steps=steps, **args_kwargs)
    timer = StepTimer()
    start = time.perf_counter()
    if name == "trl":
        trainer = DPOTrainer(model_dir, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])  # fmt: skip
    else:
        method, mode = {"dpo": ("dpo", "model"), "simpo": ("simpo", "none"), "precomputed": ("dpo", "precomputed")}[name]
        trainer = PlusTrainer(model_dir, args=args, method=method, reference_mode=mode, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    build = time.perf_counter() - start
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return timer.times, build


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--json", help="also write the results to this file")
    opts = parser.parse_args()
    if opts.quick:
        opts.steps, opts.warmup, opts.repeats, opts.hidden, opts.layers, opts.seq_len = 3, 1, 1, 64, 2, 64

    torch.set_num_threads(opts.threads)
    tokenizer = build_tokenizer()
    model_dir = tempfile.mkdtemp(prefix="trl-plus-bench-")
    build_model(tokenizer, hidden_size=opts.hidden, num_layers=opts.layers).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    total = opts.warmup + opts.steps
    dataset = Dataset.from_list(make_rows(total * opts.batch_size, opts.seq_len))
    args_kwargs = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=opts.batch_size, max_length=opts.seq_len,
        learning_rate=1e-5, bf16=False, gradient_checkpointing=False, save_strategy="no", report_to="none",
        logging_steps=total, disable_tqdm=True, dataloader_pin_memory=False, seed=0,
    )  # fmt: skip
    print(f"torch threads {torch.get_num_threads()}, hidden {opts.hidden}, layers {opts.layers}, "
          f"seq_len {opts.seq_len}, batch {opts.batch_size} pairs, {opts.steps} timed steps x {opts.repeats} repeats")

    names = ["trl", "dpo", "simpo", "precomputed"]
    times = {n: [] for n in names}
    builds = {n: [] for n in names}
    for repeat in range(opts.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            step_times, build = run(name, model_dir, tokenizer, dataset, args_kwargs, total)
            times[name] += step_times[opts.warmup :]
            builds[name].append(build)

    median = {n: statistics.median(t) for n, t in times.items()}
    print(f"\n{'configuration':<34}{'median ms/step':>16}{'build s':>10}")
    labels = {"trl": "trl.DPOTrainer (sigmoid)", "dpo": "PlusTrainer dpo (live reference)",
              "simpo": "PlusTrainer simpo (no reference)", "precomputed": "PlusTrainer dpo (precomputed ref)"}  # fmt: skip
    for n in names:
        print(f"{labels[n]:<34}{1000 * median[n]:>16.1f}{statistics.median(builds[n]):>10.2f}")
    ratios = {
        "dpo / trl": median["dpo"] / median["trl"],
        "simpo / dpo": median["simpo"] / median["dpo"],
        "precomputed / dpo": median["precomputed"] / median["dpo"],
    }
    print()
    for key, value in ratios.items():
        verdict = "PASS" if value <= TARGETS[key] else "MISS"
        print(f"{key:<20} {value:6.3f}   target <= {TARGETS[key]:.2f}   {verdict}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"options": vars(opts), "median_s": median, "build_s": builds, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
