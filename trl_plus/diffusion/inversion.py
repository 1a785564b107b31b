"""Deterministic DDIM inversion (with optional ReNoise averaging) and the matching DDIM sampler, on an ε-prediction
DDPM schedule (SmPO and Inversion-DPO noise their latents this way instead of drawing ε).

Inversion timesteps are τ_k = k·T/n (k = 0..n−1, "leading" spacing, as diffusers' ``DDIMInverseScheduler``); step k
takes the latent from level τ_k − T/n (ᾱ = ``alpha_start`` below 0: 1, or ᾱ_0 as ``set_alpha_to_one=False``) to level
τ_k with the model's ε predicted at the current latent and τ_k (the official codes' and diffusers' convention):

    x̂0 = (x − √(1−ᾱ_a)·ε)/√ᾱ_a,   x_b = √ᾱ_b·x̂0 + √(1−ᾱ_b)·ε.

ReNoise (Garibi et al. 2024): ``renoise`` corrections per step, each predicting ε again at the provisional next latent
(same τ) and stepping from the current latent with the mean of all predictions so far; ``renoise=1`` is SmPO's
``(noise_pred + noise_pred_1)/2``. ``until`` stops each row before its own level (steps with τ_k < until[row] only).
The sampler inverts the steps: level τ_k -> τ_k − T/n with ε(x, τ_k), so invert-then-sample reconstructs x0 up to
the model's ε changing between the two latents of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TrlPlusError
from .models import denoise


@dataclass
class Inversion:
    """``latent``: the inverted latents ``[N, ...]``; ``timesteps`` ``[n]`` τ_k; ``latents[k]`` the input of step k
    (the latent at which ``predictions[k]``, the ε used by step k, was made); ``steps[k]`` ``[N]`` bool, the rows
    step k moved."""

    latent: torch.Tensor
    timesteps: torch.Tensor
    latents: list[torch.Tensor] = field(default_factory=list)
    predictions: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)


def alphas_cumprod(scheduler) -> torch.Tensor:
    """ᾱ of a DDPM-family scheduler (fp64 on the CPU); a flow-matching scheduler has none (one-line error)."""
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        raise TrlPlusError(f"DDIM inversion needs a DDPM noise schedule (alphas_cumprod); "
                           f"{type(scheduler).__name__} has none")  # fmt: skip
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise TrlPlusError(f"DDIM inversion here is for ε-prediction; the scheduler predicts "
                           f"{scheduler.config.prediction_type}")  # fmt: skip
    return table.detach().to("cpu", torch.float64)


def inversion_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    """``[n]`` τ_k = k·T/n, ascending (T the scheduler's training steps)."""
    total = scheduler.config.num_train_timesteps
    if not 1 <= num_steps <= total:
        raise TrlPlusError(f"inversion steps must be in [1, {total}], got {num_steps}")
    return torch.arange(num_steps, dtype=torch.long) * (total // num_steps)


def guided_prediction(model, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any],
                      uncond: dict[str, Any] | None = None, guidance_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """ε(x, t | cond), or with classifier-free guidance ε_u + g·(ε_c − ε_u) when ``guidance_scale`` ≠ 1 (``uncond``:
    the empty prompt's conditioning, rows as ``cond``)."""
    if guidance_scale == 1.0:
        return denoise(model, x, t, cond)
    if uncond is None:
        raise TrlPlusError("classifier-free guidance needs the unconditional (empty-prompt) conditioning")
    both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
    eps_u, eps_c = denoise(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def _move(x, eps, alpha_a, alpha_b):
    x0 = (x - (1 - alpha_a).sqrt() * eps) / alpha_a.sqrt()
    return alpha_b.sqrt() * x0 + (1 - alpha_b).sqrt() * eps


def _alpha(table, level: int, alpha_start: float, like: torch.Tensor) -> torch.Tensor:
    value = table[level] if level >= 0 else torch.tensor(alpha_start, dtype=torch.float64)
    return value.to(like.device, torch.float32)


@torch.no_grad()
def ddim_invert(model, x0: torch.Tensor, cond: dict[str, Any], scheduler, num_steps: int, *, until=None,
                renoise: int = 0, guidance_scale: float = 1.0, uncond: dict[str, Any] | None = None,
                alpha_start: float = 1.0, record: bool = False) -> Inversion:  # fmt: skip
    """Invert clean latents ``x0`` ``[N, ...]`` (see the module doc). ``until``: ``[N]`` model timesteps (or an int)
    each row stops below; ``record``: keep every step's input latent and prediction. No grad; fp32 arithmetic."""
    table = alphas_cumprod(scheduler)
    taus = inversion_timesteps(scheduler, num_steps)
    stride = scheduler.config.num_train_timesteps // num_steps
    n = x0.size(0)
    if until is not None:
        until = torch.as_tensor(until, dtype=torch.long).reshape(-1).expand(n).to(x0.device)
    x = x0.float().clone()
    out = Inversion(latent=x, timesteps=taus)
    dtype = x0.dtype
    for tau in taus.tolist():
        move = torch.ones(n, dtype=torch.bool, device=x.device) if until is None else tau < until
        if not bool(move.any()):
            break
        a, b = _alpha(table, tau - stride, alpha_start, x), _alpha(table, tau, alpha_start, x)
        t = torch.full((n,), tau, dtype=torch.long, device=x.device)
        predictions = [guided_prediction(model, x.to(dtype), t, cond, uncond, guidance_scale).float()]
        for _ in range(renoise):
            provisional = _move(x, torch.stack(predictions).mean(0), a, b)
            predictions.append(guided_prediction(model, provisional.to(dtype), t, cond, uncond, guidance_scale).float())
        eps = torch.stack(predictions).mean(0)
        if record:
            out.latents.append(x.clone())
            out.predictions.append(eps)
            out.steps.append(move)
        mask = move.view(-1, *([1] * (x.dim() - 1)))
        x = torch.where(mask, _move(x, eps, a, b), x)
    out.latent = x
    return out


@torch.no_grad()
def ddim_sample(model, x: torch.Tensor, cond: dict[str, Any], scheduler, num_steps: int, *, start: int | None = None,
                guidance_scale: float = 1.0, uncond: dict[str, Any] | None = None,
                alpha_start: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Deterministic DDIM sampling (η = 0) from latents at level ``start`` (default: the last inversion level) down to
    x0, over the same timesteps as :func:`ddim_invert` with ``num_steps``."""
    table = alphas_cumprod(scheduler)
    taus = inversion_timesteps(scheduler, num_steps)
    stride = scheduler.config.num_train_timesteps // num_steps
    if start is not None:
        taus = taus[taus <= start]
    x = x.float().clone()
    n, dtype = x.size(0), x.dtype
    for tau in reversed(taus.tolist()):
        t = torch.full((n,), tau, dtype=torch.long, device=x.device)
        eps = guided_prediction(model, x.to(dtype), t, cond, uncond, guidance_scale).float()
        x = _move(x, eps, _alpha(table, tau, alpha_start, x), _alpha(table, tau - stride, alpha_start, x))
    return x
