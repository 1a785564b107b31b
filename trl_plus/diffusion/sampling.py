"""Sampling from a denoiser, with records: the trajectories online diffusion methods train on.

diffusers has no log-probability API, so the loop is ours — over the same arithmetic as diffusers' schedulers:

- **DDIM(η)** on a DDPM noise schedule (ε, v or x0 prediction; ``clip_sample`` as the scheduler's config says), the
  step of ``DDIMScheduler.step(model_output, t, x_t, eta, variance_noise=z)``:
  x̂0 from the prediction, σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)),
  μ = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ_t²)·ε̂,  x_prev = μ + σ_t·z.
  With η > 0 each step is a Gaussian, and its **log-density** of the stored x_prev (:func:`ddim_step_logp`: the
  element mean of log N(x_prev; μ, σ_t²), as D3PO's ``ddim_step_with_logprob``) is recorded per step and image. The
  same function, applied with grad to a model's prediction at a stored x_t, is the per-step "sequence log-prob" of
  D3PO/SPO's losses (:func:`transition_logps`). Since μ is affine in ε̂ (without clipping), the log-ratio of two
  models on one transition is the weighted error difference −c₂²/(2σ_t²)·[ē(ε̂_θ, ε*) − ē(ε̂_ref, ε*)] against the
  implied noise ε* = (x_prev − c₁x_t)/c₂ (the design note's §1.4, tested).
- **Flow matching** (``FlowMatchEulerDiscreteScheduler``): the Euler ODE x_next = x + (σ_next − σ)·v̂ on the
  scheduler's σ grid (its shift; Flux's resolution-dependent shift ``mu`` as FluxPipeline computes it). It has no
  step density (η must be 0); records keep latents, σ and predictions.

Classifier-free guidance: ε̂ = ε_u + g·(ε_c − ε_u) (``guidance`` g; 1: none, one forward). ``guidance_fn(x, t,
prediction, step) -> prediction`` changes each step's (guided) prediction — inference-time reward guidance
(:func:`reward_guidance`, Flow-NRG's ṽ = v − w·σ/(1 − σ)·∇r). Every draw comes from the caller's generator (seeded
runs give identical samples); model calls run without grad, in the model's dtype, with the arithmetic in fp32.

A **lagged or EMA copy** of the trained weights (Diffusion-DRO's buffer sampler, GradSPO's and AWM's EMA) is a
:class:`ParameterState`: a copy of the trainable tensors only (a LoRA's, with a LoRA), swapped into the same
denoiser for sampling or scoring — never a second backbone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrlPlusError
from .inversion import guided_prediction
from .models import FLOW_SCHEDULERS

#: The sampler settings of a diffusion ``rollout.decoding`` block, with their defaults.
SAMPLING_DEFAULTS: dict[str, Any] = {"steps": 20, "eta": 1.0, "guidance": 1.0}
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def is_flow_scheduler(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching one (sampled with the Euler ODE)."""
    return type(scheduler).__name__ in FLOW_SCHEDULERS


def check_sampling(settings: dict[str, Any], scheduler=None, where: str = "rollout.decoding") -> dict[str, Any]:
    """The sampler settings (``steps``, ``eta``, ``guidance``) merged over :data:`SAMPLING_DEFAULTS`, each checked
    in one line naming ``where``; with a ``scheduler``, also what it can do (a flow ODE has no η; at most
    ``num_train_timesteps`` steps)."""
    from ..contract import did_you_mean

    for key in settings:
        if key not in SAMPLING_DEFAULTS:
            raise TrlPlusError(f"{where}.{key}: not a diffusion sampler setting (steps, eta, guidance)"
                               f"{did_you_mean(key, SAMPLING_DEFAULTS)}")  # fmt: skip
    merged = {**SAMPLING_DEFAULTS, **settings}
    steps, eta, guidance = merged["steps"], merged["eta"], merged["guidance"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TrlPlusError(f"{where}.steps: the sampler's denoising steps must be a positive integer, got {steps!r}")
    for key, value in (("eta", eta), ("guidance", guidance)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise TrlPlusError(f"{where}.{key}: expected a number >= 0, got {value!r}")
    if scheduler is not None:
        total = scheduler.config.num_train_timesteps
        if steps > total:
            raise TrlPlusError(f"{where}.steps: {steps} steps, but the scheduler has {total} training timesteps")
        if is_flow_scheduler(scheduler) and eta != 0:
            raise TrlPlusError(f"{where}.eta: {type(scheduler).__name__} samples with the deterministic Euler ODE; "
                               f"set eta: 0 (a stochastic step needs a DDPM-family scheduler)")  # fmt: skip
        if not is_flow_scheduler(scheduler) and getattr(scheduler, "alphas_cumprod", None) is None:
            raise TrlPlusError(f"{where}: {type(scheduler).__name__} has neither a DDPM noise schedule nor flow sigmas "
                               "to sample with")  # fmt: skip
        if scheduler.config.get("thresholding", False):
            raise TrlPlusError(f"{where}: the scheduler's dynamic thresholding makes a step non-Gaussian; set "
                               "thresholding: false in its config")  # fmt: skip
    return merged


@dataclass
class Trajectory:
    """A recorded sampling run of N images over S steps.

    - ``latents`` ``[S+1, N, ...]``: x_T (the start), then the latent after each step (``latents[-1]`` = x0);
    - ``timesteps`` ``[S]``: each step's model timestep (DDPM index; flow: 1000·σ); ``prev_timesteps`` ``[S]`` the
      level each step lands on (−1: the final step, ᾱ = the scheduler's final ᾱ); flow runs: ``sigmas`` ``[S+1]``;
    - ``predictions`` ``[S, N, ...]``: the (guided) model output each step used;
    - ``logps`` ``[S, N]``: the element-mean log-density of each stored step (DDIM with η > 0), else ``None``;
    - ``eta``, ``guidance``: the settings it was sampled with; ``stds`` ``[S]``: each DDIM step's σ_t (0: a
      deterministic step with no density, as the last one when the final ᾱ is 1), ``None`` for a flow run.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    predictions: torch.Tensor
    logps: torch.Tensor | None
    eta: float
    guidance: float
    sigmas: torch.Tensor | None = None
    stds: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        """S: the steps recorded."""
        return int(self.timesteps.numel())

    def stochastic_steps(self) -> list[int]:
        """The indices of the steps with a density (σ_t > 0): the ones a step-density loss can train on."""
        if self.stds is None or self.logps is None:
            return []
        return [j for j in range(self.steps) if float(self.stds[j]) > 0]


# -- DDIM arithmetic ----------------------------------------------------------------------------------------------
def _table(scheduler, values: torch.Tensor, device) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    final = getattr(scheduler, "final_alpha_cumprod", None)  # a DDPMScheduler has none: DDIM's set_alpha_to_one
    if final is None:
        final = 1.0 if scheduler.config.get("set_alpha_to_one", True) else alphas[0]
    final = torch.as_tensor(final, dtype=torch.float32)
    values = torch.as_tensor(values, dtype=torch.long).cpu()
    out = torch.where(values >= 0, alphas[values.clamp(min=0)], final)
    return out.to(device)


def ddim_sigma(scheduler, t: torch.Tensor, prev_t: torch.Tensor, eta: float, device=None) -> torch.Tensor:
    """``[N]`` σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)) of DDIM steps t -> prev_t (fp32)."""
    a_t, a_prev = _table(scheduler, t, device), _table(scheduler, prev_t, device)
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def predicted_x0(scheduler, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor, with_noise: bool = False):
    """``[N, ...]`` x̂0 of the model ``output`` at ``x_t`` and timesteps ``t`` ``[N]`` (ε, v or x0 prediction, as the
    scheduler's ``prediction_type`` says; fp32, differentiable, unclipped), or ``(x̂0, ε̂)`` with ``with_noise``."""
    x_t, output = x_t.float(), output.float()
    a_t = _expand(_table(scheduler, t, x_t.device), x_t)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        x0, eps = (x_t - (1 - a_t).sqrt() * output) / a_t.sqrt(), output
    elif kind == "v_prediction":
        x0, eps = a_t.sqrt() * x_t - (1 - a_t).sqrt() * output, a_t.sqrt() * output + (1 - a_t).sqrt() * x_t
    elif kind == "sample":
        x0, eps = output, (x_t - a_t.sqrt() * output) / (1 - a_t).sqrt()
    else:
        raise TrlPlusError(f"DDIM sampling: the scheduler's prediction_type {kind!r} is not epsilon, v_prediction or "
                           "sample")  # fmt: skip
    return (x0, eps) if with_noise else x0


def ddim_step_mean(scheduler, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor,
                   eta: float) -> torch.Tensor:  # fmt: skip
    """``[N, ...]`` μ of the DDIM(η) step t -> prev_t (per row) from the model ``output`` (ε, v or x0 as the scheduler
    predicts; x̂0 clipped when its config says ``clip_sample``), differentiable in ``output``; fp32."""
    config = scheduler.config
    x_t = x_t.float()
    a_t = _expand(_table(scheduler, t, x_t.device), x_t)
    a_prev = _expand(_table(scheduler, prev_t, x_t.device), x_t)
    x0, eps = predicted_x0(scheduler, x_t, output, t, with_noise=True)
    if config.get("clip_sample", False):
        limit = config.get("clip_sample_range", 1.0)
        x0 = x0.clamp(-limit, limit)
        if config.get("use_clipped_model_output", False):
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = _expand(ddim_sigma(scheduler, t, prev_t, eta, x_t.device), x_t)
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps


def gaussian_logp(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[N]`` the element mean of log N(x; mean, std²) over all dims but the first (``std`` ``[N]``). A row with
    std 0 is a deterministic step (DDIM's last step when the scheduler's final ᾱ is 1: ``set_alpha_to_one``; SD's
    schedulers set it false): it has no density, and is given 0 with no gradient (no signal for a ratio loss)."""
    std = _expand(std.to(mean.device, torch.float32), mean)
    live = std > 0
    safe = torch.where(live, std, torch.ones_like(std))
    value = -((x.float().detach() - mean) ** 2) / (2 * safe**2) - safe.log() - LOG_SQRT_2PI
    return (value * live).flatten(1).mean(1)


def ddim_step_logp(scheduler, x_t, output, x_prev, t, prev_t, eta: float) -> torch.Tensor:
    """``[N]`` the element-mean log-density of the stored ``x_prev`` under the DDIM(η) step from ``x_t`` with the model
    ``output`` (differentiable in it; ``x_prev`` detached). Needs η > 0; a deterministic step (σ_t = 0) gives 0."""
    if eta <= 0:
        raise TrlPlusError("a DDIM step with eta = 0 is deterministic: it has no log-density (sample with eta > 0)")
    mean = ddim_step_mean(scheduler, x_t, output, t, prev_t, eta)
    return gaussian_logp(x_prev, mean, ddim_sigma(scheduler, t, prev_t, eta, mean.device))


def implied_noise(scheduler, x_t, x_prev, t, prev_t, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ε*, w)``: the noise prediction that would make ``x_prev`` the DDIM step's mean from ``x_t`` (ε-prediction,
    no clipping): ε* = (x_prev − c₁x_t)/c₂, and the weight w = c₂²/(2σ_t²) with which the log-ratio of two models on
    this transition is −w·[ē(ε̂_θ, ε*) − ē(ε̂_ref, ε*)] (element means)."""
    a_t = _expand(_table(scheduler, t, x_t.device), x_t)
    a_prev = _expand(_table(scheduler, prev_t, x_t.device), x_t)
    sigma = ddim_sigma(scheduler, t, prev_t, eta, x_t.device)
    c1 = (a_prev / a_t).sqrt()
    c2 = (1 - a_prev - _expand(sigma, x_t) ** 2).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()
    eps = (x_prev.float() - c1 * x_t.float()) / c2
    return eps, c2.reshape(c2.size(0), -1)[:, 0] ** 2 / (2 * sigma**2)


def sampling_timesteps(scheduler, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [S], prev_timesteps [S])`` of a DDIM run of ``steps`` steps with the scheduler's spacing
    (``DDIMScheduler.set_timesteps``; prev = t − T/S, −1 ends the run)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    timesteps = ddim.timesteps.to(torch.long)
    prev = timesteps - scheduler.config.num_train_timesteps // steps
    return timesteps, prev.clamp(min=-1)


def flow_sigmas(scheduler, steps: int, image_tokens: int | None = None) -> torch.Tensor:
    """``[S+1]`` σ of a flow run (the scheduler's ``set_timesteps``, its shift; dynamic shifting: ``mu`` from the
    image's token count as FluxPipeline's ``calculate_shift``), ending at 0."""
    import copy

    schedule = copy.deepcopy(scheduler)
    kwargs = {}
    if schedule.config.get("use_dynamic_shifting", False):
        c = schedule.config
        tokens = image_tokens or c.get("base_image_seq_len", 256)
        slope = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (
            c.get("max_image_seq_len", 4096) - c.get("base_image_seq_len", 256))
        kwargs["mu"] = tokens * slope + c.get("base_shift", 0.5) - slope * c.get("base_image_seq_len", 256)
    schedule.set_timesteps(steps, **kwargs)
    return schedule.sigmas.to(torch.float32)


def _predict(model, x, t, cond, uncond, guidance, dtype):
    return guided_prediction(model, x.to(dtype), t, cond, uncond, guidance).float()


@torch.no_grad()
def sample(model, scheduler, x_T: torch.Tensor, cond: dict[str, Any], steps: int, *, eta: float = 1.0,
           guidance: float = 1.0, uncond: dict[str, Any] | None = None, generator: torch.Generator | None = None,
           record: bool = True, guidance_fn: Callable | None = None, noise: torch.Tensor | None = None,
           start: int = 0, stop: int | None = None) -> Trajectory:  # fmt: skip
    """Sample from ``x_T`` ``[N, ...]`` under ``cond`` (rows as x_T) in ``steps`` steps (see the module doc) and return
    the :class:`Trajectory` (with ``record=False`` only the start and the end latents, no predictions).

    ``noise`` ``[S, N, ...]``: the DDIM steps' variance noise z (default: drawn from ``generator``, one ``[N, ...]``
    draw per step); ``start`` / ``stop``: run steps ``start .. stop−1`` of the ``steps``-step grid only (a branch from
    a stored x_t: SPO); ``guidance_fn(x, timesteps [N], prediction, step) -> prediction``: applied to each step's
    guided prediction (called with grad enabled; the model itself runs without)."""
    check_sampling({"steps": steps, "eta": eta, "guidance": guidance}, scheduler, where="sample")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    flow = is_flow_scheduler(scheduler)
    n, device = x_T.size(0), x_T.device
    if flow:
        tokens = x_T[0, 0].numel() // 4 if x_T.dim() == 4 else None
        sigmas, stds = flow_sigmas(scheduler, steps, tokens), None
        timesteps = sigmas[:-1] * scheduler.config.num_train_timesteps
        prev = sigmas[1:] * scheduler.config.num_train_timesteps
    else:
        sigmas = None
        timesteps, prev = sampling_timesteps(scheduler, steps)
        stds = ddim_sigma(scheduler, timesteps, prev, eta)
    stop = steps if stop is None else stop
    x = x_T.float()
    latents, predictions, logps = [x], [], []
    for j in range(start, stop):
        t = timesteps[j].expand(n).to(device)
        output = _predict(model, x, t, cond, uncond, guidance, dtype)
        if guidance_fn is not None:
            with torch.enable_grad():
                output = guidance_fn(x, t, output, j).detach().float()
        if flow:
            x_next = x + (sigmas[j + 1] - sigmas[j]).to(device) * output
        else:
            p = prev[j].expand(n).to(device)
            mean = ddim_step_mean(scheduler, x, output, t, p, eta)
            std = ddim_sigma(scheduler, t, p, eta, device)
            if eta > 0:
                z = noise[j - start] if noise is not None else torch.randn(x.shape, generator=generator)
                x_next = mean + _expand(std, mean) * z.to(device, torch.float32)
                if record:
                    logps.append(gaussian_logp(x_next, mean, std))
            else:
                x_next = mean
        if record:
            predictions.append(output)
            latents.append(x_next)
        x = x_next
    if not record:
        latents.append(x)
    steps_run = slice(start, stop)
    empty = torch.empty(0, *x.shape)
    return Trajectory(
        latents=torch.stack(latents), timesteps=timesteps[steps_run], prev_timesteps=prev[steps_run],
        predictions=torch.stack(predictions) if predictions else empty, logps=torch.stack(logps) if logps else None,
        eta=float(eta), guidance=float(guidance), sigmas=None if sigmas is None else sigmas[start:stop + 1],
        stds=None if stds is None else stds[steps_run],
    )  # fmt: skip


def reward_guidance(scorer: Callable, weight: float, *, max_factor: float = 100.0) -> Callable:
    """A ``guidance_fn`` for flow sampling (Flow-NRG): ṽ = v − w·σ/(1 − σ)·∇_x r(x, σ), ``scorer(x, sigma [N]) ->
    [N]`` a differentiable latent reward; σ/(1 − σ) is capped at ``max_factor`` (it diverges at σ → 1)."""

    def guide(x, timesteps, prediction, step):
        if weight == 0:
            return prediction
        sigma = (timesteps.float() / 1000).to(x.device)
        latent = x.detach().float().requires_grad_(True)
        reward = scorer(latent, sigma).sum()
        (grad,) = torch.autograd.grad(reward, latent)
        factor = (sigma / (1 - sigma).clamp(min=1e-6)).clamp(max=max_factor)
        return prediction - weight * _expand(factor, prediction) * grad

    return guide


# -- lagged / EMA copies of the trained weights ---------------------------------------------------------------------
class ParameterState:
    """A copy of a model's trainable tensors (a LoRA's, under LoRA) — a lagged sampler or an EMA anchor on the same
    base. :meth:`update` refreshes it (``decay`` 0: a copy, as Diffusion-DRO's every-N-steps sync; else
    s ← decay·s + (1 − decay)·θ, an EMA); ``with state.applied(model):`` swaps it into the model and back."""

    def __init__(self, model):
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise TrlPlusError("a lagged or EMA copy needs trainable parameters (a LoRA or a trained denoiser)")
        params = dict(model.named_parameters())
        self.tensors = {name: params[name].detach().clone() for name in self.names}
        self.updates = 0

    @torch.no_grad()
    def update(self, model, decay: float = 0.0) -> None:
        """Refresh from ``model``'s current trainable tensors (see the class doc)."""
        params = dict(model.named_parameters())
        for name in self.names:
            if decay == 0:
                self.tensors[name].copy_(params[name])
            else:
                self.tensors[name].mul_(decay).add_(params[name].detach(), alpha=1 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model):
        """``model`` with this state's tensors in place of its trainable ones for the ``with`` block (no grad)."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.tensors[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors, for a checkpoint."""
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the tensors a checkpoint saved."""
        for name in self.names:
            self.tensors[name].copy_(state[name])
