"""The denoising scorer: a denoiser and a batch of clean latents x0 -> per-image pseudo log-likelihoods.

For each image it draws a timestep t and noise ε (shared by the images of one example when the method says so),
forms x_t and the target from the scheduler — DDPM-style ``add_noise`` with target ε (``epsilon``),
``get_velocity`` (``v_prediction``) or x0 (``sample``); flow matching x_t = (1 − σ)·x0 + σ·ε with target ε − x0
(``flow``) — and scores ℓ = −w(t)·ē, ē the element mean of (prediction − target)² in fp32. w = ½ by default
(``half``: with it the text DPO loss at the official β is the official Diffusion-DPO loss), 1 (``unit``),
½·SNR(t) (``snr``), ½·min(SNR, γ)/SNR (``min_snr``, ε; /(SNR + 1) for v: diffusers' min-SNR weighting) or, for
flow models, ½·(1 − σ)² (``flow_elbo``: ε − ε̂ = (1 − σ)·(v − v̂), so ℓ is −½ of the ε-error, the ELBO weighting of the
Flow-DPO paper's β_t = β(1 − t)² ablation).
Timesteps: ``uniform`` (over the scheduler's training steps), ``logit_normal`` / ``mode`` (diffusers'
``compute_density_for_timestep_sampling``, u·N indexing the scheduler's tables, as diffusers' SD3 example),
``stratified`` (one u per stratum of [0, 1) over the batch, shuffled) or ``range`` (uniform over the training steps
whose model timestep lies in ``timestep_range`` [lo, hi): DDPM the index itself, e.g. [0, 200) for an SDXL refiner;
flow models 1000·σ, the scheduler's timesteps table).

:func:`check_scoring_options` checks these options (and ``draws``, ``flip``) in a recipe's ``training`` block before
any model loads.

Reduction: ē is the element mean over all latent dims, in fp32. Per segment (video methods, DenseDPO): when the
:class:`Noised` carries ``segments`` ``[N, F]`` — each latent frame's segment id 0..S−1 (−1: not scored; frames on
dim 2 of ``[N, C, F, h, w]``) — ē is ``[N, S]``, the element mean over the latent frames of each segment, ℓ too,
and the score's ``mask`` is 1 where a segment has frames (``Scoring.segments`` names the batch field the trainer
reads them from). Without segments (the default) everything is ``[N]`` / ``[N, 1]`` as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import TrlPlusError
from .models import FLOW_SCHEDULERS, denoise

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "stratified", "range")
WEIGHTINGS = ("half", "unit", "snr", "min_snr", "flow_elbo")
#: Weightings defined by a DDPM noise schedule / by the flow interpolation only.
DDPM_WEIGHTINGS, FLOW_WEIGHTINGS = ("snr", "min_snr"), ("flow_elbo",)
#: Horizontal flips of the training images: none, one per example (its K images flip together) or one per image
#: (the official Diffusion-DPO ``train.py``: ``RandomHorizontalFlip`` inside each image's transform).
FLIPS = ("none", "shared", "independent")


def check_scoring_options(options: dict[str, Any], where=lambda key: key) -> None:
    """One line naming the ``training`` field and what it allows, for the scorer's options of a recipe (or a
    :class:`~trl_plus.diffusion.trainer.DiffusionConfig`): ``timestep_sampling``, ``timestep_range`` (with
    ``range`` only: [lo, hi), 0 <= lo < hi), ``weighting``, ``flip``, ``draws`` (a positive integer).
    ``where(key)`` says where the error points (``recipe.yaml: training.key``)."""
    sampling = options.get("timestep_sampling", "uniform")
    if sampling not in TIMESTEP_SAMPLING:
        raise TrlPlusError(f"{where('training.timestep_sampling')}: {sampling!r} is not one of "
                           f"{', '.join(TIMESTEP_SAMPLING)}")  # fmt: skip
    bounds = options.get("timestep_range")
    if sampling == "range":
        if bounds is None or len(bounds) != 2 or not 0 <= bounds[0] < bounds[1]:
            raise TrlPlusError(f"{where('training.timestep_range')}: timestep_sampling: range draws t uniformly in "
                               f"[lo, hi); give timestep_range: [lo, hi] with 0 <= lo < hi (model timesteps: the "
                               f"DDPM index, 1000·σ for flow models), got {bounds!r}")  # fmt: skip
    elif bounds is not None:
        raise TrlPlusError(f"{where('training.timestep_range')}: used only with timestep_sampling: range (it is "
                           f"{sampling})")  # fmt: skip
    weighting = options.get("weighting", "half")
    if weighting not in WEIGHTINGS:
        raise TrlPlusError(f"{where('training.weighting')}: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    flip = options.get("flip", "none")
    if flip not in FLIPS:
        raise TrlPlusError(f"{where('training.flip')}: {flip!r} is not one of {', '.join(FLIPS)}")
    draws = options.get("draws", 1)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise TrlPlusError(f"{where('training.draws')}: the (t, ε) draws per example must be a positive integer, got "
                           f"{draws!r}")  # fmt: skip


def check_weighting(weighting: str, target: str, where: str = "training.weighting") -> None:
    """A weighting the scheduler's target can carry: SNR weightings need a DDPM noise schedule, ``flow_elbo`` the
    flow interpolation."""
    if target == "flow" and weighting in DDPM_WEIGHTINGS:
        raise TrlPlusError(f"{where}: {weighting} is defined by a DDPM noise schedule; a flow-matching scheduler has "
                           "none (use half, unit or flow_elbo)")  # fmt: skip
    if target != "flow" and weighting in FLOW_WEIGHTINGS:
        raise TrlPlusError(f"{where}: {weighting} weights the flow velocity error by (1 − σ)²; the scheduler predicts "
                           f"{target}, not a flow (use half, unit, snr or min_snr)")  # fmt: skip


def flow_elbo_factor(sigma: torch.Tensor) -> torch.Tensor:
    """(1 − σ)²: the factor between the ε-error and the flow velocity error of x_t = (1 − σ)·x0 + σ·ε
    (``weighting: flow_elbo`` is ½ of it; Flow-DPO's ``beta_schedule: elbo`` scales β by it)."""
    return (1 - sigma) ** 2


def scheduler_target(scheduler) -> str:
    """The target a scheduler trains: ``flow`` for a flow-matching scheduler, else its ``prediction_type``."""
    if type(scheduler).__name__ in FLOW_SCHEDULERS:
        return "flow"
    return scheduler.config.get("prediction_type", "epsilon")


@dataclass
class Noised:
    """One row per image, rows sequence-major as the text trainer's: the noised input, the model timestep, the target
    and the weight w(t) of ℓ = −w·ē; ``t`` is the scheduler's index (DDPM) and ``sigma`` the flow σ (else ``None``)."""

    x_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    sigma: torch.Tensor | None = None
    segments: torch.Tensor | None = None  # [N, F] segment id per latent frame (−1: unscored): per-segment errors


@dataclass
class ScoreOutput:
    """What the scorer gives the loss (``ctx.outputs``): ``logps`` ``[N, 1]`` ℓ of the policy (with grad), ``mask``
    ones, ``ref_logps`` the reference's (no grad; ``None`` without a reference), the raw errors ``mse`` /
    ``ref_mse`` ``[N]`` and the :class:`Noised` inputs. With per-segment scoring (``noised.segments``) ``logps`` /
    ``ref_logps`` / ``mse`` / ``ref_mse`` are ``[N, S]`` and ``mask`` is 1 where a segment has latent frames."""

    logps: torch.Tensor
    mask: torch.Tensor
    ref_logps: torch.Tensor | None
    mse: torch.Tensor
    ref_mse: torch.Tensor | None
    noised: Noised
    #: A method's own per-row terms from its ``score()`` for its loss (AWM's velocity-space KL penalties), by name.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class DenoisingScorer:
    """Noise, predict, score (see the module doc). ``share_timestep`` / ``share_noise``: the rows of one ``group``
    (the K images of an example) get the same t / ε."""

    def __init__(self, scheduler, *, target: str = "auto", timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, weighting: str = "half", snr_gamma: float = 5.0,
                 share_timestep: bool = True, share_noise: bool = True,
                 timestep_range: tuple[float, float] | None = None):  # fmt: skip
        check_scoring_options({"timestep_sampling": timestep_sampling, "weighting": weighting,
                               "timestep_range": timestep_range})  # fmt: skip
        self.scheduler = scheduler
        self.target = scheduler_target(scheduler) if target == "auto" else target
        check_weighting(weighting, self.target)
        self.timestep_sampling, self.weighting, self.snr_gamma = timestep_sampling, weighting, snr_gamma
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.share_timestep, self.share_noise = share_timestep, share_noise
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.range_steps = None if timestep_range is None else self._range_steps(*timestep_range)

    def _range_steps(self, low: float, high: float) -> torch.Tensor:
        """The scheduler indices whose model timestep lies in [low, high) (``timestep_sampling: range``)."""
        steps = torch.arange(self.num_train_timesteps)
        values = steps.float() if self.target != "flow" else self.scheduler.timesteps[steps].float()
        kept = steps[(values >= low) & (values < high)]
        if kept.numel() == 0:
            raise TrlPlusError(f"training.timestep_range: [{low}, {high}) holds none of the scheduler's training "
                               f"timesteps ({float(values.min()):g} to {float(values.max()):g})")  # fmt: skip
        return kept

    # -- drawing ------------------------------------------------------------------------------------------------
    def _uniform01(self, n: int, generator) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        if self.timestep_sampling == "stratified":
            return (torch.randperm(n, generator=generator) + torch.rand(n, generator=generator)) / n
        scheme = "none" if self.timestep_sampling == "uniform" else self.timestep_sampling
        return compute_density_for_timestep_sampling(scheme, n, self.logit_mean, self.logit_std, self.mode_scale,
                                                     generator=generator)  # fmt: skip

    def sample_timesteps(self, n: int, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(model timesteps, scheduler index t, σ or None)`` for ``n`` draws (on the CPU)."""
        steps = self.num_train_timesteps
        if self.timestep_sampling == "range":  # uniform over the allowed training steps
            index = self.range_steps[torch.randint(0, self.range_steps.numel(), (n,), generator=generator)]
            if self.target != "flow":
                return index, index, None
            return self.scheduler.timesteps[index].float(), index, self.scheduler.sigmas[index].float()
        if self.target != "flow":
            if self.timestep_sampling == "uniform":  # the official draw: an integer in [0, N)
                t = torch.randint(0, steps, (n,), generator=generator)
            else:
                t = (self._uniform01(n, generator) * steps).long().clamp(0, steps - 1)
            return t, t, None
        index = (self._uniform01(n, generator) * steps).long().clamp(0, steps - 1)
        return self.scheduler.timesteps[index].float(), index, self.scheduler.sigmas[index].float()

    def forward_noise(self, x0: torch.Tensor, group: torch.Tensor, num_groups: int, generator=None) -> Noised:
        """x_t, target and weight for clean latents ``x0`` ``[N, ...]``; rows with the same ``group`` id share t and
        ε when the scorer says so (t is drawn first, then ε: the same seed gives the same draws)."""
        n, device = x0.size(0), x0.device
        group_cpu = group.cpu()
        draws = num_groups if self.share_timestep else n
        timesteps, t, sigma = self.sample_timesteps(draws, generator)
        if self.share_timestep:
            timesteps, t = timesteps[group_cpu], t[group_cpu]
            sigma = None if sigma is None else sigma[group_cpu]
        shape = (num_groups if self.share_noise else n, *x0.shape[1:])
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if self.share_noise:
            noise = noise[group_cpu]
        noise = noise.to(device=device, dtype=x0.dtype)
        timesteps, t = timesteps.to(device), t.to(device)
        if self.target == "flow":
            s = sigma.to(device=device, dtype=x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
            x_t, target = (1 - s) * x0 + s * noise, noise - x0
        else:
            x_t = self.scheduler.add_noise(x0, noise, t)
            if self.target == "epsilon":
                target = noise
            elif self.target == "v_prediction":
                target = self.scheduler.get_velocity(x0, noise, t)
            elif self.target == "sample":
                target = x0
            else:
                raise TrlPlusError(f"the scheduler's prediction_type {self.target!r} is not one trl-plus can train")
        weight = self.weights(t).to(device)
        return Noised(x_t, timesteps, target, weight, noise, t, None if sigma is None else sigma.to(device))

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """``[N]`` w(t) of ℓ = −w·ē (fp32) at scheduler indices ``t``."""
        if self.weighting in ("half", "unit"):
            return torch.full(t.shape, 0.5 if self.weighting == "half" else 1.0, dtype=torch.float32)
        if self.weighting == "flow_elbo":
            return 0.5 * flow_elbo_factor(self.scheduler.sigmas[t.cpu()].float())
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t.cpu())
        if self.weighting == "snr":
            return 0.5 * snr
        clipped = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
        return 0.5 * clipped / (snr + 1 if self.target == "v_prediction" else snr)

    # -- scoring --------------------------------------------------------------------------------------------
    @staticmethod
    def errors(model, noised: Noised, cond: dict[str, Any]) -> torch.Tensor:
        """``[N]`` ē: the element mean of (prediction − target)² per row, in fp32 (fp64 for a float64 model;
        ``[N, S]`` per-segment means when ``noised.segments`` is set: :func:`segment_means`)."""
        prediction = denoise(model, noised.x_t, noised.timesteps, cond)
        dtype = torch.promote_types(prediction.dtype, torch.float32)
        squared = (prediction.to(dtype) - noised.target.to(dtype)) ** 2
        if noised.segments is not None:
            return segment_means(squared, noised.segments)[0]
        return squared.reshape(squared.size(0), -1).mean(1)

    def score(self, model, x0: torch.Tensor, group: torch.Tensor, num_groups: int, cond: dict[str, Any],
              reference=None, generator=None, segments: torch.Tensor | None = None) -> ScoreOutput:  # fmt: skip
        """The policy's ℓ (with grad) and, when ``reference(noised, cond) -> [N] errors`` is given, the
        reference's, on one draw of (t, ε); ``segments`` ``[N, F]``: per-segment scores (see the module doc)."""
        noised = self.forward_noise(x0, group, num_groups, generator)
        noised.segments = segments
        return self.score_noised(model, noised, cond, reference)

    def score_noised(self, model, noised: Noised, cond: dict[str, Any], reference=None) -> ScoreOutput:
        """The policy's ℓ = −w·ē (with grad) and the reference's (no grad) on given inputs and targets (a method
        that makes its own x_t, e.g. by DDIM inversion, builds the :class:`Noised` and calls this)."""
        mse = self.errors(model, noised, cond)
        ref_mse = None
        if reference is not None:
            with torch.no_grad():
                ref_mse = reference(noised, cond).detach()
        if noised.segments is not None:  # [N, S]: one weight per row, a mask for segments without frames
            weight, mask = noised.weight.unsqueeze(-1), segment_mask(noised.segments, mse.size(1)).to(mse.dtype)
            ref_logps = None if ref_mse is None else -(weight * ref_mse)
            return ScoreOutput(-(weight * mse), mask, ref_logps, mse, ref_mse, noised)
        logps = -(noised.weight * mse).unsqueeze(-1)
        ref_logps = None if ref_mse is None else -(noised.weight * ref_mse).unsqueeze(-1)
        return ScoreOutput(logps, torch.ones_like(logps), ref_logps, mse, ref_mse, noised)


def segment_mask(segments: torch.Tensor, num_segments: int | None = None) -> torch.Tensor:
    """``[N, S]`` bool: which segments of each row have latent frames (``segments`` ``[N, F]`` ids, −1 unscored)."""
    count = int(segments.max()) + 1 if num_segments is None else num_segments
    return (segments.unsqueeze(-1) == torch.arange(count, device=segments.device)).any(1)


def segment_means(squared: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, S] element means of squared errors over the latent frames of each segment, [N, S] bool mask)`` for
    video errors ``squared`` ``[N, C, F, h, w]`` and ``segments`` ``[N, F]`` (segment id per frame, −1: left out;
    S = the largest id + 1; a segment without frames gets 0 and mask False). Every frame holds C·h·w elements, so
    the mean over a segment's elements is the mean of its frames' means."""
    if squared.dim() < 3 or squared.size(2) != segments.size(1):
        raise TrlPlusError(f"per-segment scores need latents [N, C, F, ...] with F = {segments.size(1)} latent frames "
                           f"(the segments' length); got latents of shape {tuple(squared.shape)}")  # fmt: skip
    n, frames = squared.shape[0], squared.shape[2]
    per_frame = squared.transpose(1, 2).reshape(n, frames, -1).mean(2)  # [N, F]
    segments = segments.to(per_frame.device)
    count = int(segments.max()) + 1
    onehot = (segments.unsqueeze(-1) == torch.arange(count, device=segments.device)).to(per_frame.dtype)  # [N, F, S]
    sizes = onehot.sum(1)
    return torch.einsum("nf,nfs->ns", per_frame, onehot) / sizes.clamp(min=1), sizes > 0
