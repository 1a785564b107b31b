"""Group RL: ``PlusGRPOTrainer`` (the builtin ``grpo``: no method hooks, the path mo-grpo takes) ÷ TRL's
``GRPOTrainer`` with the same reward function, model, prompts, group size and completion length, in one process.

Both trainers get a fresh copy of the same seeded model; the reward is the count of digits (ours through the
core's ``digits`` scorer as a TRL reward function, TRL's as a plain function). ``min_new_tokens`` is set to
``max_new_tokens`` so both generate exactly as many tokens. Runs alternate (ours, TRL, TRL, ours...) and the first
``--warmup`` steps of each are dropped; it prints the median step time and the ratio (target ≤ 1.03).

    python bench/bench_group.py            # hidden 256, 4 layers, 4 prompts × 8 completions × 32 tokens, 10 steps
    python bench/bench_group.py --quick    # smoke run in seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings

import torch
from bench_step_time import StepTimer  # (bench/ is on sys.path: python bench/<script>.py)
from datasets import Dataset

from trl_plus.models.tiny import build_model, build_tokenizer


def digits(prompts=None, completions=None, **_):
    """TRL's reward function: the digits in each completion."""
    return [float(sum(ch.isdigit() for ch in str(c))) for c in completions]


def config(args, out):
    from trl import GRPOConfig

    return GRPOConfig(output_dir=out, max_steps=args.steps, learning_rate=1e-5, per_device_train_batch_size=
                      args.prompts * args.n, num_generations=args.n, max_completion_length=args.new_tokens,
                      temperature=1.0, generation_kwargs={"min_new_tokens": args.new_tokens}, report_to="none",
                      save_strategy="no", bf16=False, logging_steps=10**6, activation_checkpointing=False,
                      disable_tqdm=True, seed=0, dataloader_pin_memory=False, use_cpu=True)  # fmt: skip


def run(args, which: str, prompts, out) -> list[float]:
    from trl import GRPOTrainer

    from trl_plus import GRPO, Rollout
    from trl_plus.registry import get_registry
    from trl_plus.trainers.group import PlusGRPOTrainer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(tokenizer, hidden_size=args.hidden, num_layers=args.layers)
    timer = StepTimer()
    dataset = Dataset.from_list(prompts)
    if which == "ours":
        scorer = get_registry().get_scorer("digits")
        rollout = Rollout(n=args.n, decoding={"max_new_tokens": args.new_tokens, "temperature": 1.0,
                                              "min_new_tokens": args.new_tokens})  # fmt: skip
        trainer = PlusGRPOTrainer(model, method=GRPO, args=config(args, out), train_dataset=dataset,
                                  processing_class=tokenizer, scorers=[(scorer(scorer.Config()), 1.0)],
                                  rollout=rollout, callbacks=[timer])  # fmt: skip
    else:
        trainer = GRPOTrainer(model, reward_funcs=digits, args=config(args, out), train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.train()
    return timer.steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.new_tokens, args.steps, args.repeats, args.warmup = 64, 2, 8, 3, 1, 1
    warnings.filterwarnings("ignore")
    prompts = [{"prompt": f"Count to {i}:"} for i in range(args.prompts * args.steps)]
    times = {"ours": [], "trl": []}
    for r in range(args.repeats):
        for which in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            with tempfile.TemporaryDirectory() as out:
                times[which] += run(args, which, prompts, out)[args.warmup :]
    print(f"model random, hidden {args.hidden}, {args.layers} layers, char vocabulary; {args.prompts} prompts × "
          f"{args.n} completions × {args.new_tokens} tokens per step; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"PlusGRPOTrainer (grpo)  step {medians['ours']:.3f} s")
    print(f"trl GRPOTrainer         step {medians['trl']:.3f} s")
    print(f"ratio PlusGRPOTrainer / GRPOTrainer: {medians['ours'] / medians['trl']:.3f} (target <= 1.03)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
