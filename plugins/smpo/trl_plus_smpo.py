"""SmPO-Diffusion — Smoothed Preference Optimization via ReNoise Inversion (ICML 2025; arXiv 2506.02698; official code
JaydenLyh/SmPO ``train.py``, read). Diffusion-DPO with two changes:

1. the noisy latents come from DDIM inversion of each clean latent with the current policy (no grad, one ReNoise
   correction per step, 5 inverse steps over [0, 1000) for SD 1.5) up to the last inverse level below the sampled t,
   and the regression target is the implied noise τ_t = (x̃ − √ᾱ_t·x0)/√(1 − ᾱ_t) (ᾱ of t itself, as the code);
2. β is scaled per pair by γ·(2p − 1), p = σ(ñ_w − ñ_l) the smoothed preference probability from two reward scores
   min-max normalised with fixed constants (PickScore: 0.1154352650, 0.2820157111), γ = 10:

    z = −(β/2)·γ·(2p − 1)·[(ē_θ^w − ē_θ^l) − (ē_ref^w − ē_ref^l)],  L = mean −log σ(z),  β = 2000 (SD 1.5).

p < 0.5 (the reward model prefers the "rejected" image) flips the factor's sign, which is the same loss as swapping
the pair: the data's order need not follow the reward model.
"""

from __future__ import annotations

from typing import Any

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

#: The official min-max constants of PickScore on Pick-a-Pic (preprocessing.py / train.py).
PICKSCORE_MIN, PICKSCORE_MAX = 0.11543526500463486, 0.28201571106910706


class SmPOConfig(MethodConfig):
    """SmPO hyperparameters (official SD 1.5 defaults)."""

    beta: float = Field(2000, gt=0, description="β in the ½ convention (official --beta_dpo: 2000 SD 1.5, 5000 SDXL)")
    gamma: float = Field(10.0, gt=0, description="γ, the sensitivity of the smoothed label (hard-coded 10)")
    score_min: float = Field(PICKSCORE_MIN, description="min-max normalisation: the reward scores' minimum")
    score_max: float = Field(PICKSCORE_MAX, description="min-max normalisation: the reward scores' maximum")
    inversion_steps: int = Field(5, ge=1, description="DDIM-inverse steps over [0, T) (official: 5 SD 1.5, 10 SDXL)")
    renoise: int = Field(1, ge=0, description="ReNoise corrections per inverse step (official: 1)")
    inversion: bool = Field(True, description="false: forward noising with random ε (the ablation's DPO + smoothing)")


def preference_probability(chosen_score, rejected_score, low: float, high: float):
    """p = σ(ñ_w − ñ_l), ñ = (s − min)/(max − min): the official exp(ñ_w)/(exp(ñ_w) + exp(ñ_l))."""
    import torch

    span = high - low
    return torch.sigmoid((chosen_score - low) / span - (rejected_score - low) / span)


class SmPO(DiffusionMethod):
    """Diffusion-DPO on policy-DDIM-inverted latents with a per-pair β·γ·(2p − 1)."""

    name = "smpo"
    taxonomy = {"data.quality": "noise", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "image", "source": "inferred"}
    paper = Paper("Smoothed Preference Optimization via ReNoise Inversion for Aligning Diffusion Models with Varied "
                  "Human Preferences", "2506.02698", code="JaydenLyh/SmPO")  # fmt: skip
    summary = ("Diffusion-DPO on policy DDIM(+ReNoise)-inverted latents, per-pair β·10·(2p − 1) from two reward "
               "scores, β 2000")  # fmt: skip
    needs = Needs(reference="yes", fields=("chosen_score", "rejected_score"), precomputable_reference=False)
    scoring = Scoring(targets=("epsilon",), share_timestep=True, share_noise=False)
    Config = SmPOConfig
    batch_fields = ("chosen_score", "rejected_score")
    #: The repository's example pairs with synthetic PickScore-range scores.
    example_data = {"path": "recipes/data/diffusion_scored_pairs.jsonl"}

    def prepare_split(self, dataset: Any, recipe: Any, split: str) -> Any:
        """The core's image checks; a ``data.<split>.label`` that swaps a pair's images swaps its scores with them
        (the official SmPO path ignores the human label: leave ``label`` unset to order by the scores alone)."""
        spec = getattr(recipe.data, split)
        if spec.label is not None:
            def swap(row):
                if row[spec.label] == 0:
                    row["chosen_score"], row["rejected_score"] = row["rejected_score"], row["chosen_score"]
                return row

            dataset = dataset.map(swap)
        return super().prepare_split(dataset, recipe, split)

    def score(self, trainer: Any, inputs: Any, model: Any = None, generator: Any = None) -> Any:
        """One t per pair; each image inverted separately with the policy (no grad) to the last level below t; the
        target is the implied noise at t; the policy (grad) and the reference score the same (x̃, t, τ_t)."""
        import torch

        from trl_plus import Noised, ddim_invert  # torch-heavy: imported when a run scores

        if not self.config.inversion:
            return None
        model = trainer.model if model is None else model
        scorer = trainer.scorer
        x0 = trainer.clean_latents(inputs, generator).float()
        size = inputs["prompt_ids"].size(0)
        group = inputs["group"]
        dtype = trainer.denoiser_dtype(model)
        cond = trainer.conditioning(inputs["prompt_ids"], group, dtype, x0.device)
        timesteps = scorer.sample_timesteps(size, generator)[1].to(x0.device)[group.to(x0.device)]
        was_training = model.training
        model.eval()
        try:
            inverted = ddim_invert(model, x0.to(dtype), cond, scorer.scheduler, self.config.inversion_steps,
                                   until=timesteps, renoise=self.config.renoise).latent  # fmt: skip
        finally:
            model.train(was_training)
        alpha = scorer.scheduler.alphas_cumprod.to(x0.device, torch.float32)[timesteps]
        alpha = alpha.view(-1, *([1] * (x0.dim() - 1)))
        target = (inverted - alpha.sqrt() * x0) / (1 - alpha).sqrt()
        noised = Noised(inverted.to(dtype), timesteps, target, scorer.weights(timesteps.cpu()).to(x0.device),
                        target, timesteps)  # fmt: skip
        reference = None if trainer.reference_mode == "none" else trainer.reference_errors
        return scorer.score_noised(model, noised, cond, reference)

    def loss(self, ctx: LossContext) -> LossOutput:
        """−log σ(β·γ(2p − 1)·(ρ_w − ρ_l)), ρ = ℓ_θ − ℓ_ref (ℓ = −½·ē: the card's z); logs ``smpo/p`` and
        ``smpo/factor`` (γ(2p − 1))."""
        import torch.nn.functional as F

        if ctx.ref_token_logps is None:
            raise TrlPlusError("smpo needs the reference's scores (reference.mode: auto, model or adapter)")
        p = preference_probability(ctx.batch["chosen_score"], ctx.batch["rejected_score"], self.config.score_min,
                                   self.config.score_max)  # fmt: skip
        ratios = ctx.logps() - ctx.ref_logps()  # [2, B]
        factor = (self.config.gamma * (2 * p - 1)).to(ratios.dtype)
        z = self.config.beta * factor * (ratios[0] - ratios[1])
        losses = -F.logsigmoid(z)
        return LossOutput(losses.mean(), rewards=(self.config.beta * ratios).detach(),
                          metrics={"smpo/p": p.detach().mean(), "smpo/factor": factor.detach().mean()})  # fmt: skip


@hookimpl
def register_methods(register):
    register(SmPO)
