"""Online DPO step time, generation included: PlusTrainer (an online DPO on the rollout stage) against TRL's
experimental ``OnlineDPOTrainer``, in one process, on the same model, prompts, completion length and decoding.

A benchmark, not a test. It prints, per trainer: median seconds per optimiser step (generate → score → loss →
backward → step), the share of the step spent generating, completion tokens generated per second, and the ratio
PlusTrainer / OnlineDPOTrainer (target ≤ 1.0: ours scores through the fused LM head; TRL's materialises
full-vocabulary logits for both samples of both models).

Setup: one random Llama (``trl_plus.models.tiny.build_model`` over the char tokenizer: a small vocabulary, so the
fused head's saving is small here and grows with a real one), full fine-tuning with a frozen reference copy in both, fp32, no
gradient checkpointing, 2 samples per prompt, ``--new-tokens`` new tokens (``min_new_tokens`` = max: every sample is
that long in both, so both score the same token counts), temperature 0.9, the same reward function (digits in the
completion). The first ``--warmup`` steps of each run are dropped; runs alternate over ``--repeats``.

    python bench/bench_online.py             # hidden 256, 4 layers, 8 prompts × 2, 48 new tokens
    python bench/bench_online.py --quick     # smoke run in seconds
    python bench/bench_online.py --model smollm2-135m-instruct --steps 5 --new-tokens 32   # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings

import torch
from bench_step_time import StepTimer  # (bench/ is on sys.path: python bench/<script>.py)
from datasets import Dataset

from trl_plus import DPO, OnlineMethod, Paper
from trl_plus.models.tiny import build_model, build_tokenizer
from trl_plus.trainers.preference import PlusTrainer


class BenchOnlineDPO(OnlineMethod, DPO):
    name = "bench-online-dpo"
    paper = Paper("Direct Language Model Alignment from Online AI Feedback", "2402.04792")


def digits(prompts=None, completions=None, **_):
    """The reward: digits in the completion."""
    return [float(sum(ch.isdigit() for ch in str(c))) for c in completions]


def timed(obj, name: str, bucket: list):
    """Wrap ``obj.name`` so each call's seconds land in ``bucket``."""
    original = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = original(*a, **k)
        bucket.append(time.perf_counter() - t)
        return out

    setattr(obj, name, wrapper)


def model(args):
    torch.manual_seed(0)
    if args.model:  # a real model: an alias (smollm2-135m-instruct) or a folder, float32
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from trl_plus.models.load import resolve_model_path

        path = resolve_model_path(args.model)
        tok = AutoTokenizer.from_pretrained(path)
        tok.pad_token = tok.pad_token or tok.eos_token
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok
    tok = build_tokenizer()
    m = build_model(tok, hidden_size=args.hidden, num_layers=args.layers)
    return m, tok


def run_ours(args, prompts, out):
    from trl import DPOConfig

    from trl_plus import Rollout
    from trl_plus.registry import get_registry

    m, tok = model(args)
    scorer_cls = get_registry().get_scorer("digits")
    config = DPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.prompts,
                       learning_rate=1e-5, report_to="none", save_strategy="no", bf16=False, logging_steps=10**6,
                       activation_checkpointing=False, disable_tqdm=True, seed=0, dataloader_pin_memory=False)  # fmt: skip
    decoding = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "temperature": 0.9}
    timer, gen = StepTimer(), []
    trainer = PlusTrainer(m, args=config, method=BenchOnlineDPO, train_dataset=Dataset.from_list(prompts),
                          processing_class=tok, scorers=[(scorer_cls(scorer_cls.Config()), 1.0)],
                          rollout=Rollout(n=2, decoding=decoding), callbacks=[timer])  # fmt: skip
    timed(trainer, "generate", gen)
    trainer.train()
    return timer.steps, gen


def run_trl(args, prompts, out):
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    m, tok = model(args)
    config = OnlineDPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.prompts,
                             learning_rate=1e-5, report_to="none", save_strategy="no", bf16=False,
                             logging_steps=10**6, gradient_checkpointing=False, disable_tqdm=True, seed=0,
                             dataloader_pin_memory=False, max_new_tokens=args.new_tokens, temperature=0.9,
                             generation_kwargs={"min_new_tokens": args.new_tokens},
                             max_length=args.new_tokens + 64)  # fmt: skip
    timer, gen = StepTimer(), []
    trainer = OnlineDPOTrainer(m, reward_funcs=digits, args=config, train_dataset=Dataset.from_list(prompts),
                               processing_class=tok, callbacks=[timer])  # fmt: skip
    timed(trainer, "_generate", gen)
    trainer.train()
    return timer.steps, gen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a real model instead of the random one (e.g. smollm2-135m-instruct: a "
                                            "49k vocabulary, where the fused LM head matters)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.new_tokens, args.steps, args.repeats = 64, 2, 8, 3, 1
        args.warmup = 1
    warnings.filterwarnings("ignore")
    prompts = [{"prompt": f"Count to {i}:"} for i in range(args.prompts * args.steps)]
    results = {"ours": ([], []), "trl": ([], [])}
    for r in range(args.repeats):
        for name in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
            with tempfile.TemporaryDirectory() as out:
                steps, gen = (run_ours if name == "ours" else run_trl)(args, prompts, out)
            results[name][0].extend(steps[args.warmup :])
            per_step = len(gen) // max(len(steps), 1)  # generate calls per step (ours: 1, TRL: 1)
            results[name][1].extend(gen[args.warmup * per_step :])
    tokens = args.prompts * 2 * args.new_tokens
    print(f"model {args.model or f'random, hidden {args.hidden}, {args.layers} layers, char vocabulary'}; {args.prompts} prompts × 2 samples "
          f"× {args.new_tokens} new tokens per step; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = {}
    for name, label in (("ours", "PlusTrainer online DPO"), ("trl", "trl OnlineDPOTrainer")):
        steps, gen = results[name]
        step, g = statistics.median(steps), statistics.median(gen) * max(1, len(gen) // max(len(steps), 1))
        rows[name] = step
        print(f"{label:26s} step {step:7.3f} s   generating {100 * g / step:5.1f} %   "
              f"{tokens / g:8.0f} tokens/s generated")
    print(f"ratio PlusTrainer / OnlineDPOTrainer: {rows['ours'] / rows['trl']:.3f} (target <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
