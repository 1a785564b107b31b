"""ABC — Alignment by Classification (Dai, Wei, Wang, Wang, Tang; NeurIPS 2025, "Aligning Text-to-Image Diffusion
Models to Human Preference by Classification"; official code dailongquan/abc announced, not obtainable: the formula is
the paper's, as the card reads it). Reference-free: each preference triplet (y, x⁺, x⁻) gets a second prompt
y⁻ = y + " " + suffix ("The image that aligns less with human preferences"), and the policy alone scores four
denoising errors with one t and one ε shared by the triplet:

    s₁ = s(x⁺, y⁺), s₂ = s(x⁻, y⁺), s₃ = s(x⁻, y⁻), s₄ = s(x⁺, y⁻)      (s = element-mean squared error, w_t = 1)
    ι(neg, pos) = s_pos² + (s_neg − sg[s_pos] − δ)²                      (Circle-loss margin, paper Eq. 17-19)
    L = mean over triplets of softplus(ι(s₂, s₁)) + softplus(ι(s₄, s₃)),  δ = 0.025

Under y⁺ the preferred image is the positive one; under y⁻ the dispreferred image is. ι ≥ 0, so L ≥ 2·log 2, reached
at s_pos = 0, s_neg = δ: the loser's error is pulled to a margin δ above the winner's, not pushed up without bound.
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
    denoising_errors,
    hookimpl,
)

#: The paper's augmentation sentence (appended to the prompt for y⁻).
SUFFIX = "The image that aligns less with human preferences"
#: The example key of y⁻'s text-cache row.
NEGATIVE_PROMPT_ID = "negative_prompt_id"
#: The four (image, prompt) rows of a triplet, in the order of the loss context's K axis.
TERMS = ("winner|y+", "loser|y+", "loser|y-", "winner|y-")


class ABCConfig(MethodConfig):
    """ABC hyperparameters (paper defaults)."""

    delta: float = Field(0.025, ge=0, description="δ, the margin of the negative's error above the positive's "
                         "(paper: 0.025 for SD 1.5 and SDXL, element-mean MSE scale)")
    suffix: str = Field(SUFFIX, min_length=1, description="appended (after a space) to the prompt to make y⁻")
    stop_gradient: bool = Field(True, description="sg[s_pos] in the margin term (paper Eq. 19: O⁻ = sg[s_pos] + δ)")


def circle_margin(negative, positive, delta: float, stop_gradient: bool = True):
    """ι = s_pos² + (s_neg − sg[s_pos] − δ)² (elementwise)."""
    anchor = positive.detach() if stop_gradient else positive
    return positive**2 + (negative - anchor - delta) ** 2


def abc_losses(errors, delta: float, stop_gradient: bool = True):
    """``[B]`` per-triplet ABC losses and the two ι ``[2, B]`` from the errors ``[4, B]`` in :data:`TERMS` order."""
    import torch
    import torch.nn.functional as F

    iota = torch.stack([circle_margin(errors[1], errors[0], delta, stop_gradient),
                        circle_margin(errors[3], errors[2], delta, stop_gradient)])  # fmt: skip
    return F.softplus(iota).sum(0), iota


class FourTermCollator:
    """The core's latent collator (winner, loser per triplet) plus ``negative_prompt_ids`` ``[B]`` (y⁻'s text-cache
    rows); ``num_sequences`` is 4: the loss sees the four (image, prompt) terms, scored by :meth:`ABC.score`."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        if any(NEGATIVE_PROMPT_ID not in e for e in examples):
            raise TrlPlusError("abc: an example has no y⁻ prompt (the trainer registers it from each row's prompt)")
        batch = self.base(examples)
        if batch["num_sequences"] != 2:
            raise TrlPlusError(f"abc scores (winner, loser) pairs; got {batch['num_sequences']} images per example")
        batch["negative_prompt_ids"] = torch.tensor([e[NEGATIVE_PROMPT_ID] for e in examples], dtype=torch.long)
        batch["num_sequences"] = 4
        return batch


class ABC(DiffusionMethod):
    """Reference-free circle-margin classification of (image, prompt) pairs, with a suffixed second prompt."""

    name = "abc"
    taxonomy = {"data.feedback": "point", "learning.paradigm": "offline", "constraint.reference": "reference-free",
                "property": (), "scope": "image", "source": "inferred"}
    paper = Paper("Aligning Text-to-Image Diffusion Models to Human Preference by Classification",
                  "none: NeurIPS 2025, OpenReview YvypxK4kut",
                  code="dailongquan/abc")  # fmt: skip
    summary = ("reference-free: softplus of a circle margin on 4 denoising errors (x±, y±), y⁻ = y + a "
               "'less preferred' suffix, δ 0.025")  # fmt: skip
    needs = Needs(reference="no", precomputable_reference=False)
    scoring = Scoring(targets=("epsilon", "v_prediction", "flow", "sample"), share_timestep=True, share_noise=True)
    Config = ABCConfig

    def negative_prompt(self, prompt: str) -> str:
        """y⁻: the prompt with the suffix appended after one space."""
        prompt = prompt.rstrip()
        return f"{prompt} {self.config.suffix}" if prompt else self.config.suffix

    def extra_prompts(self, row: dict[str, Any]) -> dict[str, str]:
        """y⁻ of the row, encoded once into the trainer's text cache."""
        return {NEGATIVE_PROMPT_ID: self.negative_prompt(row.get("prompt", ""))}

    def batch_collator(self) -> Any:
        """:class:`FourTermCollator` over the core's latent collator."""
        return FourTermCollator(super().batch_collator())

    def score(self, trainer: Any, inputs: Any, model: Any = None, generator: Any = None) -> Any:
        """The four terms of each triplet on one (t, ε) per triplet: rows [x⁺|y⁺, x⁻|y⁺, x⁻|y⁻, x⁺|y⁻] × B, the same
        sample of the winner's (and the loser's) latent in its two rows; no reference forward."""
        import torch

        model = trainer.model if model is None else model
        if trainer.args.caption_dropout > 0 and model.training:
            raise TrlPlusError("abc conditions every image on y⁺ and on y⁻: training.caption_dropout must be 0")
        x0 = trainer.clean_latents(inputs, generator)
        size = inputs["prompt_ids"].size(0)
        winner, loser = x0[:size], x0[size:]
        dtype = trainer.denoiser_dtype(model)
        latents = torch.cat([winner, loser, loser, winner]).to(dtype)
        positive, negative = inputs["prompt_ids"], inputs["negative_prompt_ids"].to(inputs["prompt_ids"].device)
        prompt_rows = torch.cat([positive, positive, negative, negative])
        cond = trainer.conditioning(prompt_rows, torch.arange(4 * size), dtype, latents.device)
        group = torch.arange(size, device=latents.device).repeat(4)
        return trainer.scorer.score(model, latents, group, size, cond, None, generator)

    def loss(self, ctx: LossContext) -> LossOutput:
        """The batch mean of softplus(ι(x⁻, x⁺, y⁺)) + softplus(ι(x⁺, x⁻, y⁻)); logs ``abc/iota_pos`` (under y⁺),
        ``abc/iota_neg`` (under y⁻) and ``abc/accuracy`` (both prompts rank their positive image first).
        ``rewards``: −s per term (row 0 the winner under y⁺, row 1 the loser under y⁺)."""
        errors = denoising_errors(ctx)[0]
        if errors.size(0) != 4:
            raise TrlPlusError(f"abc's loss takes the four (image, prompt) terms; got {errors.size(0)} rows")
        losses, iota = abc_losses(errors, self.config.delta, self.config.stop_gradient)
        e = errors.detach()
        accuracy = ((e[0] < e[1]) & (e[2] < e[3])).float().mean()
        return LossOutput(losses.mean(), rewards=-e,
                          metrics={"abc/iota_pos": iota[0].detach().mean(), "abc/iota_neg": iota[1].detach().mean(),
                                   "abc/accuracy": accuracy})  # fmt: skip


@hookimpl
def register_methods(register):
    register(ABC)
