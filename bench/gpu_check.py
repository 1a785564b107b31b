"""GPU check: 5 QLoRA DPO steps of a Mistral-7B-shaped model at 2,048 tokens, trl-plus against ``trl.DPOTrainer``,
next to ``trl-plus estimate``'s prediction for the same setup.

    python bench/gpu_check.py            # one large CUDA GPU, <= 8 minutes, no hub access needed
    python bench/gpu_check.py --tiny     # the same code path on the CPU with a tiny config, in seconds

It builds the model from a config with random weights, saves it (safetensors, bf16) with the character tokenizer of
``trl_plus.testing``, and loads it as every run does: 4-bit NF4, double quantisation, bf16 compute, LoRA r 16 on all
linear layers, activation checkpointing, batch 1 pair. Each configuration of :data:`CONFIGURATIONS` is a recipe
(its ``training`` extras merged in: plain, prefix sharing, prefix sharing + packing, and on a GPU the last with
FlexAttention's block-sparse mask). It prints, per configuration, ``torch.cuda.max_memory_allocated``, the median step time (first step left out),
tokens/s, the ratio to TRL and the estimate (allocated peak and card total).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

#: (name, trainer, extra ``training`` keys). "trl" is ``trl.DPOTrainer`` on the same model, data and config.
CONFIGURATIONS = [
    ("PlusTrainer dpo, plain", "plus", {}),
    ("PlusTrainer dpo, prefix sharing", "plus", {"prefix_sharing": True}),
    ("PlusTrainer dpo, prefix sharing + packing", "plus", {"prefix_sharing": True, "packing": True}),
    ("PlusTrainer dpo, sharing + packing, FlexAttention", "plus",
     {"prefix_sharing": True, "packing": True, "model.attn_implementation": "flex_attention"}),
    ("trl.DPOTrainer", "trl", {}),
]
#: Configurations the CPU path (``--tiny``) skips: torch has no FlexAttention backward on a CPU.
GPU_ONLY = {"PlusTrainer dpo, sharing + packing, FlexAttention"}
MISTRAL_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=32000)  # fmt: skip
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=128)  # fmt: skip
LORA = {"r": 16, "alpha": 32, "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}  # fmt: skip
QUANTIZATION = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


def save_model(directory: Path, shape: dict, cuda: bool) -> str:
    """A Mistral of ``shape`` with random weights, saved in bf16 (safetensors) with the character tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from trl_plus.testing import build_tokenizer

    tokenizer = build_tokenizer()
    config = MistralConfig(**shape, max_position_embeddings=32768, tie_word_embeddings=False,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    _free(cuda)
    return str(directory)


def pair_rows(seq_len: int, n: int) -> list[dict[str, str]]:
    """``n`` pairs whose chosen and rejected sequences are each ``seq_len`` tokens (character tokenizer: half
    prompt, half completion with its EOS)."""
    prompt = seq_len // 2
    completion = seq_len - prompt - 1  # the EOS
    letters = "abcdefghijklmnopqrstuvwxyz "

    def text(pattern: str, size: int) -> str:
        return (pattern * (size // len(pattern) + 1))[:size]

    return [{"prompt": text(letters[i % 26:] + letters[: i % 26], prompt), "chosen": text("yes ", completion),
             "rejected": text("no! ", completion)} for i in range(n)]  # fmt: skip


def recipe_for(model_dir: str, data: str, output_dir: str, steps: int, seq_len: int, extra: dict, tiny: bool) -> dict:
    """The recipe of one configuration (the estimate reads the same one)."""
    return {
        "method": "dpo", "method_args": {"beta": 0.1},
        "model": {"name_or_path": model_dir, "dtype": "bfloat16", "quantization": QUANTIZATION, "lora": LORA},
        "reference": {"mode": "auto"},
        "data": {"train": {"path": data}, "report": False},
        "training": {"output_dir": output_dir, "max_steps": steps, "per_device_train_batch_size": 1,
                     "gradient_accumulation_steps": 1, "max_length": seq_len, "activation_checkpointing": True,
                     "learning_rate": 5e-6, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
                     "disable_tqdm": True, "seed": 0,
                     **({"dataloader_num_workers": 0} if tiny else {}),
                     **{k: v for k, v in extra.items() if not k.startswith("model.")}},
    } | {"model": {"name_or_path": model_dir, "dtype": "bfloat16", "quantization": QUANTIZATION, "lora": LORA,
                   **{k[len("model."):]: v for k, v in extra.items() if k.startswith("model.")}}}  # fmt: skip


class StepTimer:
    """A ``TrainerCallback`` recording each optimiser step's wall time (CUDA synchronised)."""

    def __init__(self, cuda: bool):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.sync()
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.sync()
                timer.times.append(time.perf_counter() - timer.start)

        self.cuda, self.times, self.start, self.callback = cuda, [], 0.0, Callback()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def median(self) -> float:
        """The median step time, the first (warm-up) step left out when there are more."""
        times = self.times[1:] if len(self.times) > 1 else self.times
        return statistics.median(times)


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(kind: str, recipe: dict, timer: StepTimer):
    """The trainer of one configuration: trl-plus's recipe path, or ``trl.DPOTrainer`` on the model trl-plus loads
    (the same 4-bit loading and k-bit preparation), the same LoRA config and the same ``DPOConfig``."""
    from trl_plus.config import load_recipe
    from trl_plus.run.train import build_trainer

    parsed = load_recipe(recipe)
    if kind == "plus":
        return build_trainer(parsed, callbacks=[timer.callback])
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    from trl_plus.models.load import (
        bf16_available,
        load_model,
        load_tokenizer,
        lora_config,
    )

    training = dict(recipe["training"], bf16=bf16_available())
    args = DPOConfig(**training)
    return DPOTrainer(
        load_model(parsed.model, gradient_checkpointing=True), args=args,
        train_dataset=load_dataset("json", data_files=recipe["data"]["train"]["path"], split="train"),
        processing_class=load_tokenizer(parsed.model.name_or_path), peft_config=lora_config(parsed.model.lora),
        callbacks=[timer.callback],
    )  # fmt: skip


def run(name: str, kind: str, recipe: dict, cuda: bool) -> dict:
    """Train one configuration; its figures."""
    import torch

    from trl_plus.config import load_recipe
    from trl_plus.run.estimate import estimate

    timer = StepTimer(cuda)
    _free(cuda)
    trainer = build(kind, recipe, timer)
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    tokens = recipe["training"]["per_device_train_batch_size"] * 2 * recipe["training"]["max_length"]
    predicted = estimate(load_recipe(recipe))
    del trainer
    _free(cuda)
    step = timer.median()
    return {"peak_bytes": peak, "step_s": step, "tokens_per_s": tokens / step, "steps": len(timer.times),
            "predicted_allocated_bytes": predicted.allocated, "predicted_total_bytes": predicted.total}  # fmt: skip


def report(results: dict[str, dict]) -> str:
    """The results as a table, with each configuration's step time as a ratio to TRL's."""
    trl = results.get("trl.DPOTrainer", {}).get("step_s")
    gib = 1024**3
    lines = [f"{'configuration':<50} {'peak GiB':>8} {'est. GiB':>8} {'card GiB':>8} {'step s':>8} "
             f"{'tokens/s':>9} {'/ TRL':>6}"]  # fmt: skip
    for name, r in results.items():
        peak = f"{r['peak_bytes'] / gib:.2f}" if r["peak_bytes"] is not None else "n/a"
        ratio = f"{r['step_s'] / trl:.3f}" if trl else "-"
        lines.append(f"{name:<50} {peak:>8} {r['predicted_allocated_bytes'] / gib:>8.2f} "
                     f"{r['predicted_total_bytes'] / gib:>8.2f} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
                     f"{ratio:>6}")  # fmt: skip
    lines.append("peak: torch.cuda.max_memory_allocated; est.: trl-plus estimate's allocated peak; card: its total "
                 "(+ allocator slack + CUDA context)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, refuse without CUDA (unless ``--tiny``), run every configuration, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny config, 1 step at 64 tokens (seconds)")
    parser.add_argument("--steps", type=int, help="optimiser steps per configuration (default 5; --tiny 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence = max_length (default 2048; --tiny 64)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    if not args.tiny and not cuda:
        print("gpu_check: no CUDA GPU here; run it on one, or use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    steps = args.steps or (1 if args.tiny else 5)
    seq_len = args.seq_len or (64 if args.tiny else 2048)
    from trl_plus.testing import write_jsonl

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model_dir = save_model(root / "model", TINY if args.tiny else MISTRAL_7B, cuda)
        print(f"saved a random {'tiny' if args.tiny else 'Mistral-7B-shaped'} model in {time.perf_counter() - t0:.0f} s")
        data = write_jsonl(pair_rows(seq_len, steps * 2), root / "pairs.jsonl")
        results = {}
        for i, (name, kind, extra) in enumerate(CONFIGURATIONS):
            if name in GPU_ONLY and not cuda:
                print(f"{name}: skipped (GPU only)", flush=True)
                continue
            recipe = recipe_for(model_dir, data, str(root / f"run-{i}"), steps, seq_len, extra, args.tiny)
            results[name] = run(name, kind, recipe, cuda)
            print(f"{name}: {results[name]}", flush=True)
    print()
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
