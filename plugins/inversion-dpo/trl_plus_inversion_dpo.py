"""Inversion-DPO (arXiv 2507.11554; official code MIGHTYEZ/Inversion-DPO ``train_ddim.py``, read): DPO whose per-image
quantity is a weighted distance between policy and reference noise predictions along the image's deterministic DDIM
inversion path made by the reference. No random t and no random ε: for each image, the reference inverts x0 in N
steps (no grad, classifier-free guidance 2 against the empty prompt), giving latents x_{t_k} and predictions
ε_ref(x_{t_k}); the policy predicts at the same latents (with grad, the same guidance), and

    S = (1/N)·Σ_k w_k·ē_k,  ē_k = element-mean (ε_θ − ε_ref)²,  w_k = (1 − ᾱ_k)/(2(1 − ᾱ_k)ᾱ_k) = 1/(2ᾱ_k),
    z = (β/2)·(S_w − S_l),  L = mean −log σ(z)                        (β = 2000 in the SDXL launcher).

The sign is the official code's: the loss falls as the policy leaves the reference on the winner's path and follows
it on the loser's. Every ē_k is a squared policy-reference difference, so at θ = θ_ref the loss is log 2 and its
gradient is exactly zero (a stationary point): the official code leaves it only through numerical differences — its
reference UNet is cast to the mixed-precision dtype (bf16 under the launcher's ``--mixed_precision bf16``) while the
trained UNet stays fp32. Here the same holds: a policy and reference in the same dtype start with zero gradient
(``start`` says what to do about it: ``as_official`` keeps it, ``perturb`` nudges the trainable parameters once).
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
    Scoring,
    TrlPlusError,
    hookimpl,
)


class InversionDPOConfig(MethodConfig):
    """Inversion-DPO hyperparameters (the official SDXL launcher's)."""

    beta: float = Field(2000, gt=0, description="β (the code uses β/2; launcher 2000, script default 5000)")
    inversion_steps: int = Field(80, ge=1, description="N, DDIM inversion steps (launcher 80, script default 40)")
    guidance_scale: float = Field(2.0, ge=1, description="classifier-free guidance in inversion and prediction "
                                                         "(hard-coded 2)")  # fmt: skip
    set_alpha_to_one: bool = Field(False, description="ᾱ below t = 0 (official DDIMScheduler: false, ᾱ_0)")
    start: Literal["as_official", "perturb"] = Field(
        "as_official", description="θ = θ_ref is stationary: keep it (official; numerics break it) or add "
                                   "start_noise·N(0, 1) to the trainable parameters once before the first step")
    start_noise: float = Field(1e-5, ge=0, description="scale of the one-off perturbation of start: perturb")


def path_weights(alpha_bar):
    """w_k = (1 − ᾱ_k)/(2(1 − ᾱ_k)ᾱ_k) = 1/(2ᾱ_k), the official expression."""
    return (1 - alpha_bar) / (2 * (1 - alpha_bar) * alpha_bar)


def path_distance(distances, alpha_bar):
    """S = (1/N)·Σ_k w_k·ē_k for ``distances`` ``[N, ...]`` (step-major) and ᾱ ``[N]``."""
    weights = path_weights(alpha_bar).to(distances.dtype).view(-1, *([1] * (distances.dim() - 1)))
    return (weights * distances).sum(0) / distances.size(0)


class InversionDPO(DiffusionMethod):
    """DPO on Σ_k w_k·ē_k along the reference's DDIM inversion path of each image."""

    name = "inversion-dpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "image", "source": "inferred"}
    paper = Paper("Inversion-DPO: Precise and Efficient Post-Training for Diffusion Models", "2507.11554",
                  code="MIGHTYEZ/Inversion-DPO")  # fmt: skip
    summary = ("DPO on (1/N)·Σ_k ē(ε_θ − ε_ref)/(2ᾱ_k) along the reference's DDIM inversion of each image (CFG 2), "
               "no random t or ε; zero gradient at θ = θ_ref")  # fmt: skip
    needs = Needs(reference="yes", precomputable_reference=False)
    scoring = Scoring(targets=("epsilon",), share_timestep=True, share_noise=False)
    Config = InversionDPOConfig
    _perturbed = False

    def score(self, trainer: Any, inputs: Any, model: Any = None, generator: Any = None) -> Any:
        """Invert every image with the reference (no grad), predict with the policy at each recorded latent (with
        grad); the rows' ``mse`` is S (``ref_mse`` 0: the reference's distance to itself), ``logps`` −S."""
        import torch

        from trl_plus import Noised, ScoreOutput, ddim_invert, guided_prediction  # torch-heavy: imported when scoring

        model = trainer.model if model is None else model
        if trainer.reference_mode == "none":
            raise TrlPlusError("inversion-dpo needs the reference: it inverts the images and is the target")
        if self.config.start == "perturb" and not self._perturbed and model.training:
            self._perturb(model)
        scheduler = trainer.scorer.scheduler
        x0 = trainer.clean_latents(inputs, generator)
        group, prompt_ids = inputs["group"], inputs["prompt_ids"]
        dtype = trainer.denoiser_dtype(model)
        cond = trainer.conditioning(prompt_ids, group, dtype, x0.device)
        uncond = trainer.conditioning(torch.zeros_like(prompt_ids), group, dtype, x0.device)  # row 0: ""
        table = scheduler.alphas_cumprod.to("cpu", torch.float64)
        alpha_start = 1.0 if self.config.set_alpha_to_one else float(table[0])
        guidance = self.config.guidance_scale
        with torch.no_grad(), trainer.reference_denoiser() as reference:
            path = ddim_invert(reference, x0.to(dtype), cond, scheduler, self.config.inversion_steps, record=True,
                               guidance_scale=guidance, uncond=uncond, alpha_start=alpha_start)  # fmt: skip
        distances = []
        for latent, target, tau in zip(path.latents, path.predictions, path.timesteps.tolist()):
            t = torch.full((x0.size(0),), tau, dtype=torch.long, device=x0.device)
            eps = guided_prediction(model, latent.to(dtype), t, cond, uncond, guidance).float()
            distances.append(((eps - target) ** 2).reshape(x0.size(0), -1).mean(1))
        alpha_bar = table[path.timesteps].to(x0.device, torch.float32)
        mse = path_distance(torch.stack(distances), alpha_bar)
        logps = -mse.unsqueeze(-1)
        mean_t = path.timesteps.float().mean().expand(x0.size(0)).to(x0.device)
        noised = Noised(path.latent, mean_t, path.predictions[-1], torch.ones_like(mse), path.latent, mean_t)
        zeros = torch.zeros_like(logps)
        return ScoreOutput(logps, torch.ones_like(logps), zeros, mse, zeros.squeeze(-1), noised)

    def _perturb(self, model) -> None:
        import torch

        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * self.config.start_noise)
        self._perturbed = True

    def loss(self, ctx: LossContext) -> LossOutput:
        """−log σ((β/2)·(S_w − S_l)) with S = −ℓ (the score's path distance); logs ``inversion/distance_chosen`` and
        ``inversion/distance_rejected``."""
        import torch.nn.functional as F

        distance = -ctx.logps()  # [2, B]
        z = 0.5 * self.config.beta * (distance[0] - distance[1])
        return LossOutput((-F.logsigmoid(z)).mean(), rewards=(0.5 * self.config.beta * distance).detach(),
                          metrics={"inversion/distance_chosen": distance[0].detach().mean(),
                                   "inversion/distance_rejected": distance[1].detach().mean()})  # fmt: skip


@hookimpl
def register_methods(register):
    register(InversionDPO)
