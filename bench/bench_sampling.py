"""Sampling bench (issue 19): trl-plus' recording sampler against diffusers' own DDIM loop, on the same UNet, latents,
prompts and noise.

A benchmark, not a test. It prints the median wall time of one 20-step DDIM(η = 1) sampling run of a batch, and:

  1. recording sampler (``trl_plus.sample(record=True)``: latents, predictions, step log-densities) / diffusers'
     loop (``DDIMScheduler.step(eta=1, variance_noise=z)`` per step, the loop ``StableDiffusionPipeline.__call__``
     runs; no decode)                                                                          target <= 1.10
  2. recording / not recording (``record=False``): the price of the records themselves
  3. with classifier-free guidance 5.0 (two UNet rows per image), ratio 1 again
  4. the share of a D3PO training step (the d3po plugin, official sampler: 20 steps, η 1, CFG 5; LoRA on the
     tiny-sd UNet (8x8x4 latents), 2 prompts × 2 images, the 19 stochastic steps of each pair trained) spent sampling
     (``method.rollout``) against the whole optimizer step (rollout, rows, loss, backward, optimizer)

Setup: the (32, 64)-channel UNet2DConditionModel of bench_diffusion.py (16x16x4 latents, cross-attention 32), SD's
scaled-linear schedule, 8 images per run, fp32, no grad; runs interleaved over --repeats after one warm-up.

    python bench/bench_sampling.py            # 8 images, 20 steps, 7 repeats
    python bench/bench_sampling.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build():
    from trl_plus.diffusion.tiny import tiny_unet

    return tiny_unet(sample_size=16, block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8).eval()


def diffusers_loop(unet, scheduler, x_T, cond, steps, guidance, uncond, seed):
    from diffusers import DDIMScheduler

    from trl_plus import guided_prediction

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    noise, x = torch.Generator().manual_seed(seed), x_T.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            output = guided_prediction(unet, x, t.expand(len(x)), cond, uncond, guidance)
            x = ddim.step(output, t, x, eta=1.0, variance_noise=torch.randn(x.shape, generator=noise)).prev_sample
    return x


def main(argv=None) -> int:
    from diffusers import DDPMScheduler

    from trl_plus import sample
    from trl_plus.testing import tiny_text_encoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.repeats = 2, 4, 2
    torch.manual_seed(0)
    unet = build()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False)  # fmt: skip
    encode = tiny_text_encoder()
    cond = {"text": encode([f"prompt {i}" for i in range(args.images)])["text"]}
    uncond = {"text": encode([""] * args.images)["text"]}
    x_T = torch.randn(args.images, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def ours(record, guidance):
        return sample(unet, scheduler, x_T, cond, args.steps, eta=1.0, guidance=guidance, uncond=uncond,
                      generator=torch.Generator().manual_seed(2), record=record).latents[-1]  # fmt: skip

    def theirs(guidance):
        return diffusers_loop(unet, scheduler, x_T, cond, args.steps, guidance, uncond, 2)

    for guidance in (1.0, 5.0):
        assert torch.allclose(ours(True, guidance), theirs(guidance), atol=1e-5), "the two loops disagree"
    runs = {"recording": lambda g: ours(True, g), "plain": lambda g: ours(False, g), "diffusers": theirs}
    times = {(name, g): [] for name in runs for g in (1.0, 5.0)}
    for name, guidance in times:  # warm-up: every shape once (the first call of a shape builds oneDNN kernels)
        runs[name](guidance)
    for _ in range(args.repeats):
        for (name, guidance), bucket in times.items():
            start = time.perf_counter()
            runs[name](guidance)
            bucket.append(time.perf_counter() - start)
    med = {key: statistics.median(values) * 1000 for key, values in times.items()}
    print(f"{args.images} images x {args.steps} DDIM steps (eta 1), median of {args.repeats} runs, ms:")
    for guidance in (1.0, 5.0):
        rec, plain, ref = med[("recording", guidance)], med[("plain", guidance)], med[("diffusers", guidance)]
        print(f"  guidance {guidance:g}: recording {rec:.1f}, not recording {plain:.1f}, diffusers' loop {ref:.1f}"
              f"  ->  recording / diffusers {rec / ref:.3f} (target <= 1.10), recording / not {rec / plain:.3f}")
    d3po_share(args.steps, max(2, args.repeats))
    return 0


def d3po_share(sample_steps: int, steps: int) -> None:
    """Print the share of a d3po step spent in its rollout (item 4 of the module doc)."""
    import tempfile

    from transformers import TrainerCallback

    from trl_plus import Rollout, get_registry
    from trl_plus.testing import tiny_diffusion_trainer

    if "d3po" not in get_registry().methods:
        print("  d3po: not installed (pip install -e plugins/d3po); skipped")
        return
    timings = {"rollout": [], "step": []}

    class Steps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            timings["step"].append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        rows = [{"prompt": f"prompt {i}"} for i in range(2 * (steps + 1))]
        trainer = tiny_diffusion_trainer(
            "d3po", out, lora=True, rows=rows, max_steps=steps + 1, learning_rate=1e-4, batch_size=2,
            rollout=Rollout(n=2, decoding={"steps": sample_steps, "eta": 1.0, "guidance": 5.0}),
            scorers=[(get_registry().get_scorer("latent-mean")(), 1.0)], callbacks=[Steps()],
            training={"logging_steps": 1000})  # fmt: skip
        original = trainer.method.rollout

        def timed(t, ids):
            start = time.perf_counter()
            result = original(t, ids)
            timings["rollout"].append(time.perf_counter() - start)
            return result

        trainer.method.rollout = timed
        trainer.train()
    rollout, step = statistics.median(timings["rollout"][1:]), statistics.median(timings["step"][1:])
    print(f"  d3po step (tiny UNet, LoRA, 2 prompts x 2 images, {sample_steps} steps, CFG 5): {step * 1000:.0f} ms, "
          f"of which sampling {rollout * 1000:.0f} ms = {rollout / step:.0%} (median of {steps} steps after one)")


if __name__ == "__main__":
    raise SystemExit(main())
