"""Diffusion bench (issue 21): DiffusionTrainer's diffusion-dpo step against the official Diffusion-DPO loss in a
plain loop, on the same tiny UNet, batches and seeds; and the parameter bytes of the LoRA reference (adapter off)
against a frozen copy.

A benchmark, not a test. It prints:

  1. step time, DiffusionTrainer diffusion-dpo / plain loop (official train.py loss)     target <= 1.05
  2. parameter bytes, LoRA + adapter-off reference / LoRA + frozen-copy reference          target <= 1.0

Setup: the (32, 64)-channel UNet2DConditionModel of the design note (cross-attention 32, 16x16x4 latents) with a
DDPM scheduler, random latents and fixed random text embeddings; full fine-tuning with a frozen-copy reference in
both runs of (1) (AdamW, lr 1e-6, grad-norm clip 1.0, fp32). The plain loop is SalesforceAIResearch/DiffusionDPO's
train.py step: t and ε drawn for the pair and repeated, add_noise, policy and no-grad reference forwards,
(pred − ε)².mean([1, 2, 3]), −logsigmoid(−0.5·β·(model_diff − ref_diff)).mean(), backward, clip, step. Timing: the
median of per-step wall times (the trainer's from on_step_begin to on_step_end) after --warmup steps, runs
interleaved over --repeats.

    python bench/bench_diffusion.py            # 4 pairs per step, 12 steps, 4 repeats
    python bench/bench_diffusion.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time


def build(seed: int = 0):
    from trl_plus.diffusion.tiny import tiny_unet

    return tiny_unet(sample_size=16, seed=seed, block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8)


def rows(n: int, seed: int = 0):
    from trl_plus.testing import diffusion_rows

    return diffusion_rows(n, shape=(4, 16, 16), seed=seed)


def trainer_times(pairs: int, steps: int, warmup: int) -> list[float]:
    from diffusers import DDPMScheduler
    from transformers import TrainerCallback

    from trl_plus.diffusion.models import DiffusionBundle
    from trl_plus.diffusion.trainer import DiffusionConfig, DiffusionTrainer
    from trl_plus.testing import tiny_text_encoder

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        args = DiffusionConfig(out, max_steps=steps + warmup, per_device_train_batch_size=pairs, learning_rate=1e-6,
                               logging_steps=10_000, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                               use_cpu=True, dataloader_pin_memory=False, lr_scheduler_type="constant")  # fmt: skip
        bundle = DiffusionBundle(build(), DDPMScheduler(num_train_timesteps=1000, clip_sample=False))
        trainer = DiffusionTrainer(bundle, args, method="diffusion-dpo", train_dataset=rows(pairs * (steps + warmup)),
                                   encode_prompts=tiny_text_encoder(), callbacks=[Clock()])  # fmt: skip
        trainer.train()
    return times[warmup:]


def plain_times(pairs: int, steps: int, warmup: int) -> list[float]:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from trl_plus.testing import tiny_text_encoder

    torch.manual_seed(0)
    unet = build()
    ref_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    data = rows(pairs * (steps + warmup))
    encode = tiny_text_encoder()
    times = []
    for step in range(steps + warmup):
        batch = data[step * pairs:(step + 1) * pairs]
        start = time.perf_counter()
        latents = torch.cat([torch.stack([r["x0"][0] for r in batch]), torch.stack([r["x0"][1] for r in batch])])
        hidden = encode([r["prompt"] for r in batch])["text"].repeat(2, 1, 1)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],)).long()
        timesteps = timesteps.chunk(2)[0].repeat(2)
        noise = noise.chunk(2)[0].repeat(2, 1, 1, 1)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy, timesteps, hidden).sample
        model_losses = (model_pred - noise).pow(2).mean(dim=[1, 2, 3])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        with torch.no_grad():
            ref_losses = (ref_unet(noisy, timesteps, hidden).sample.detach() - noise).pow(2).mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        inside = -0.5 * 5000 * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def parameter_bytes() -> tuple[int, int]:
    """(LoRA with the adapter-off reference, LoRA with a frozen copy of the base as reference) parameter bytes."""
    from trl_plus.config import LoraSpec
    from trl_plus.diffusion.models import add_lora

    unet = build()
    add_lora(unet, LoraSpec(r=4, alpha=4, dropout=0.0))
    policy = sum(p.numel() * p.element_size() for p in unet.parameters())
    frozen_copy = sum(p.numel() * p.element_size() for p in build().parameters())
    return policy, policy + frozen_copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.warmup = 3, 1, 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    medians = {"trainer": [], "plain": []}
    for repeat in range(args.repeats):
        order = ("trainer", "plain") if repeat % 2 == 0 else ("plain", "trainer")
        for name in order:
            run = trainer_times if name == "trainer" else plain_times
            medians[name].append(statistics.median(run(args.pairs, args.steps, args.warmup)))
    trainer, plain = statistics.median(medians["trainer"]), statistics.median(medians["plain"])
    adapter, copied = parameter_bytes()
    print(f"step time (median of {args.repeats} runs' medians, {args.pairs} pairs, 16x16x4, torch threads "
          f"{torch.get_num_threads()}):")
    print(f"  DiffusionTrainer diffusion-dpo  {1000 * trainer:8.1f} ms   runs: {[round(1000 * m, 1) for m in medians['trainer']]}")
    print(f"  plain loop (official loss)      {1000 * plain:8.1f} ms   runs: {[round(1000 * m, 1) for m in medians['plain']]}")
    print(f"  ratio                           {trainer / plain:8.3f}     (target <= 1.05)")
    print(f"parameter bytes: LoRA + adapter-off reference {adapter:,}; LoRA + frozen copy {copied:,}; "
          f"ratio {adapter / copied:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
