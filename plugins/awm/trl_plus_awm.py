"""AWM — Advantage Weighted Matching, from "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion
Models" (arXiv 2509.25050; official code scxue/advantage_weighted_matching ``scripts/train_sd3_awm.py``,
``config/dgx_awm.py``, ``flow_grpo/stat_tracking.py``).

Online, flow models. Each prompt's group of ``n`` samples is scored; per sample the group advantage
A = clip((r − mean of its prompt's rewards) / (std of all rewards + 1e-4), ±5) · 1/5. Each sample's final latent x0
is re-noised at ``train_timesteps`` stratified times of the sampler's grid (σ; fresh ε per time), v = ε − x0,
MSE = element mean (v̂_θ − v)² in float64, and ℓ = −MSE (``uniform``) or, the released ``ghuber``,
ℓ = −((MSE + 1e-10)^p − 1e-10^p)·σ/p (p = 0.25). With ρ = exp(ℓ − ℓ.detach()) (on-policy: ρ ≡ 1)

    L = mean over (sample, time) of max(−A·ρ, −A·clip(ρ, 1 − c, 1 + c))
        + β · mean (v̂_θ − v̂_ref)²  + β_ema · mean (v̂_θ − v̂_ema)²     (both only when β > 0, as the official code)

so ∇L = mean A·∇(−ℓ): positive-advantage samples are fitted, negative ones un-fitted. The EMA anchor is a copy of
the trained tensors updated after every optimizer step with decay min(0.3, 0.001·step).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from trl_plus import (
    DiffusionMethod,
    LossContext,
    LossOutput,
    MethodConfig,
    Needs,
    Paper,
    Rollout,
    Scoring,
    TrlPlusError,
    hookimpl,
)

#: The ghuber transform's floor (official ``1e-10``).
TINY = 1e-10


class AWMConfig(MethodConfig):
    """AWM hyperparameters (defaults: the released ``geneval_sd3_no_cfg`` configs)."""

    train_timesteps: int = Field(6, ge=1, description="stratified (σ, ε) draws per sample (official 6)")
    timestep_fraction: float = Field(0.9, gt=0, le=1, description="strata over sampler step indices [1, f·steps]")
    weighting: Literal["ghuber", "uniform"] = Field("ghuber", description="ℓ transform: ghuber (released) or −MSE")
    ghuber_power: float = Field(0.25, gt=0, description="p of ghuber (official 0.25)")
    adv_clip_max: float = Field(5.0, gt=0, description="advantages clipped to ±this (official 5)")
    advantage_max: float = Field(1.0, gt=0, description="then scaled by advantage_max / adv_clip_max (official 1)")
    clip_range: float = Field(1.0, gt=0, description="PPO ratio clip c (official 1; inactive on-policy)")
    beta: float = Field(0.001, ge=0, description="KL to the reference in velocity space (GenEval 0.001, OCR 0.003)")
    ema_beta: float = Field(1.0, ge=0, description="weight of the EMA-anchor penalty (official 1; only when beta > 0)")
    ema_decay_max: float = Field(0.3, ge=0, lt=1, description="EMA anchor decay min(this, ema_decay_rate·step)")
    ema_decay_rate: float = Field(0.001, ge=0, description="linear ramp of the EMA anchor's decay per step")


def group_advantages(rewards, group, clip: float = 5.0, scale: float = 0.2):
    """``[N]`` A = clip((r − mean of the row's group) / (population std of all rewards + 1e-4), ±clip) · scale
    (``flow_grpo`` ``PerPromptStatTracker`` with ``global_std``, then the trainer's clip and rescale)."""
    import torch

    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    group = torch.as_tensor(group)
    means = torch.zeros_like(rewards)
    for g in torch.unique(group):
        members = group == g
        means[members] = rewards[members].mean()
    std = rewards.std(unbiased=False) + 1e-4
    return torch.clamp((rewards - means) / std, -clip, clip) * scale


def awm_logps(mse, sigma, weighting: str = "ghuber", power: float = 0.25):
    """ℓ of per-(sample, time) errors ``mse`` at noise levels ``sigma``: −MSE (``uniform``) or
    −((MSE + 1e-10)^p − 1e-10^p)·σ/p (``ghuber``)."""
    if weighting == "uniform":
        return -mse
    return -((mse + TINY) ** power - TINY**power) * sigma / power


def policy_loss(logps, advantages, clip_range: float = 1.0, old_logps=None):
    """The PPO-clipped policy loss mean(max(−A·ρ, −A·clip(ρ, 1 − c, 1 + c))), ρ = exp(ℓ − ℓ_old) per (sample, time)
    (``exp_first``); ``old_logps`` default: ℓ detached (on-policy, ρ ≡ 1 with the gradient of ℓ)."""
    import torch

    old = logps.detach() if old_logps is None else old_logps.detach()
    ratio = torch.exp(logps - old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def stratified_indices(steps: int, draws: int, fraction: float, generator=None):
    """``[draws]`` sampler step indices, one per stratum of [1, int(fraction·steps)] (``time_type =
    discrete_wo_init``: index 0, pure noise, is never drawn)."""
    import torch

    bounds = torch.linspace(1, int(steps * fraction), draws + 1)
    lower, upper = bounds[:-1].long(), bounds[1:].long()
    u = torch.rand(draws, generator=generator)
    return lower + (u * (upper - lower)).long()


class AWMRowsCollator:
    """AWM rows -> a batch: the core's latent collator (``x0`` ``[B, ...]``, ``advantage`` ``[B]``) with
    ``num_sequences`` = ``train_timesteps`` (the scorer's rows are time-major: row j·B + b is sample b at draw j)."""

    def __init__(self, draws: int):
        self.draws = draws

    def __call__(self, rows):
        from trl_plus import LatentCollator

        batch = LatentCollator(("advantage",))(rows)
        batch["num_sequences"] = self.draws
        return batch


class AWM(DiffusionMethod):
    """Advantage-weighted flow matching on the policy's own samples (online, flow targets)."""

    name = "awm"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "online", "constraint.reference": "fixed",
                "property": (), "scope": "image", "source": "inferred"}
    family = "flow"
    paper = Paper("Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models", "2509.25050",
                  code="scxue/advantage_weighted_matching")  # fmt: skip
    summary = "online RL for flow models: group-advantage-weighted flow-matching loss (ghuber), PPO clip, KL + EMA anchor"
    needs = Needs(reference="optional", precomputable_reference=False,
                  rollout=Rollout(n=24, decoding={"steps": 14, "eta": 0.0, "guidance": 1.0}))  # fmt: skip
    Config = AWMConfig
    scoring = Scoring(targets=("flow",), share_timestep=False, share_noise=False)
    data_fields = ("prompt",)
    image_fields = ()
    batch_fields = ("advantage",)
    sequences_per_example = None
    example_data = {"path": "recipes/data/online_prompts.jsonl"}
    example_model = {"kind": "diffusion", "name_or_path": "tiny-sd3"}

    def make_examples(self, rollouts: Any) -> list[dict[str, Any]]:
        """One row per sample: ``{"prompt_id", "x0": [1, ...] its final latent, "advantage": A}`` (zero-advantage
        samples are kept, as the released code does)."""
        config = self.config
        advantages = group_advantages(rollouts.reward(), rollouts.group, config.adv_clip_max,
                                      config.advantage_max / config.adv_clip_max)  # fmt: skip
        return [{"prompt_id": int(rollouts.prompt_ids[i]), "x0": rollouts.latents[i].unsqueeze(0).float(),
                 "advantage": float(advantages[i])} for i in range(len(rollouts.prompts))]  # fmt: skip

    def batch_collator(self) -> Any:
        """:class:`AWMRowsCollator`."""
        return AWMRowsCollator(self.config.train_timesteps)

    def step_end(self, trainer: Any) -> None:
        """Update the EMA anchor with decay min(ema_decay_max, ema_decay_rate·step) after every optimizer step."""
        if self.config.beta > 0 and self.config.ema_beta > 0 and trainer.reference_mode != "none":
            step = trainer.state.global_step
            decay = min(self.config.ema_decay_max, self.config.ema_decay_rate * step)
            trainer.parameter_state("ema").update(trainer.policy(), decay=decay)

    def score(self, trainer: Any, inputs: Any, model: Any = None, generator: Any = None) -> Any:
        """``train_timesteps`` stratified σ of the sampler's grid (shared by the batch, as the official code), fresh ε
        per (sample, time); the policy's float64 errors (with grad) and, with β > 0, the reference's and the EMA
        anchor's predictions (no grad) for the velocity-space penalties (``outputs.extras``: ``kl_ref``, ``kl_ema``)."""
        import torch

        from trl_plus import Noised, ScoreOutput, denoise, flow_sigmas

        config = self.config
        if config.beta > 0 and trainer.reference_mode == "none":
            raise TrlPlusError("awm: beta > 0 needs a reference (reference.mode: auto); or set method_args.beta: 0")
        x0 = trainer.clean_latents(inputs, generator).float()
        b, draws, device = x0.size(0), config.train_timesteps, x0.device
        steps = trainer.sampling["steps"]
        tokens = x0[0, 0].numel() // 4 if x0.dim() == 4 else None
        grid = flow_sigmas(trainer.bundle.scheduler, steps, tokens).float()
        index = stratified_indices(steps, draws, config.timestep_fraction, generator).repeat_interleave(b)
        sigma = grid[index].to(device)
        noise = torch.randn((draws * b, *x0.shape[1:]), generator=generator, dtype=torch.float32).to(device)
        clean = x0.repeat(draws, *([1] * (x0.dim() - 1)))
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x_t, target = (1 - s) * clean + s * noise, noise - clean
        timesteps = sigma * trainer.bundle.scheduler.config.num_train_timesteps
        group = inputs["group"].repeat(draws)
        dtype = trainer.denoiser_dtype(model)
        cond = trainer.conditioning(inputs["prompt_ids"], group, dtype, device)
        kl = {}
        ref_mse = None
        if config.beta > 0:  # anchors first: swapping the EMA tensors in after the grad forward would break backward
            with torch.no_grad():
                with trainer.reference_denoiser() as reference:
                    ref_pred = denoise(reference, x_t.to(dtype), timesteps, cond).double()
                ref_mse = ((ref_pred - target.double()) ** 2).flatten(1).mean(1)
                if config.ema_beta > 0:
                    policy = trainer.policy()
                    with trainer.parameter_state("ema").applied(policy):
                        ema_pred = denoise(policy, x_t.to(dtype), timesteps, cond).double()
        prediction = denoise(model, x_t.to(dtype), timesteps, cond).double()
        mse = ((prediction - target.double()) ** 2).flatten(1).mean(1)
        if config.beta > 0:
            kl["ref"] = ((prediction - ref_pred) ** 2).flatten(1).mean(1)
            if config.ema_beta > 0:
                kl["ema"] = ((prediction - ema_pred) ** 2).flatten(1).mean(1)
        noised = Noised(x_t=x_t, timesteps=timesteps, target=target, weight=torch.ones_like(sigma), noise=noise,
                        t=index.to(device), sigma=sigma)  # fmt: skip
        return ScoreOutput(-mse.unsqueeze(-1), torch.ones_like(mse).unsqueeze(-1),
                           None if ref_mse is None else -ref_mse.unsqueeze(-1), mse, ref_mse, noised,
                           extras={f"kl_{name}": value for name, value in kl.items()})  # fmt: skip

    def loss(self, ctx: LossContext) -> LossOutput:
        """Policy loss (ghuber or uniform ℓ, PPO clip) + β·KL_ref + β_ema·KL_ema; ``ctx.outputs.mse`` ``[T·B]``
        time-major, ``ctx.outputs.noised.sigma``, ``ctx.batch["advantage"]`` ``[B]``."""
        config = self.config
        outputs = ctx.outputs
        if outputs is None or getattr(outputs, "mse", None) is None:
            raise TrlPlusError("awm: the loss reads the scorer's per-draw errors (ctx.outputs.mse); score with awm's score()")
        mse, sigma = outputs.mse, outputs.noised.sigma.to(outputs.mse.dtype)
        advantages = ctx.batch["advantage"].to(mse.dtype)
        draws = mse.numel() // advantages.numel()
        advantages = advantages.repeat(draws)
        logps = awm_logps(mse, sigma, config.weighting, config.ghuber_power)
        loss, ratio = policy_loss(logps, advantages, config.clip_range)
        metrics = {"awm/policy_loss": loss.detach(), "awm/mse": mse.detach().mean(),
                   "awm/advantage_abs": advantages.abs().mean(),
                   "awm/clipfrac": ((ratio.detach() - 1).abs() > config.clip_range).double().mean()}  # fmt: skip
        extras = getattr(outputs, "extras", None) or {}
        if "kl_ref" in extras:
            loss = loss + config.beta * extras["kl_ref"].mean()
            metrics["awm/kl_ref"] = extras["kl_ref"].detach().mean()
        if "kl_ema" in extras:
            loss = loss + config.ema_beta * extras["kl_ema"].mean()
            metrics["awm/kl_ema"] = extras["kl_ema"].detach().mean()
        return LossOutput(loss.float(), metrics=metrics)


@hookimpl
def register_methods(register):
    register(AWM)
