"""Diff-UAPA — Uncertainty-Aware Preference Alignment for diffusion policies (anonymous ICML-format submission;
arXiv id and official code not found). Offline, on the core's DenoisingScorer. A row is a preferred and a
dispreferred trajectory segment of k+1 images / latents each (one denoising score per step), with per-trajectory
Beta parameters (α_τ, β_τ) from a pre-trained Beta prior network (``alpha_w, beta_w, alpha_l, beta_l`` columns):

    d_t(τ)  = ℓ_ref,t − ℓ_θ,t = w(t)·(ē_θ,t − ē_ref,t)        (the core's ℓ = −w(t)·ē; w = ½ by default)
    D(τ)    = Σ_{t=0..k} γ^t d_t(τ)
    L_MLE   = −log σ(−αI · (D(τ^w) − D(τ^l)))
    ϕ(τ)    = σ(−αI · (D(τ) − D̄)),   D̄ = the batch mean of D over its 2B segments
    L_prior = −log Beta(ϕ(τ); α_τ + 1, β_τ + 1)
    L       = mean over pairs of L_MLE + L_prior(τ^w) + L_prior(τ^l)

Step t of the winner and step t of the loser share their (t, ε) draw (the Diffusion-DPO convention the card
recommends); different steps draw independently. With k = 0 and no prior (α = β = 0) it is diffusion-dpo with
β = αI on the same draws; α = β = 0 alone is the paper's Diff-CPL. Preference rounds with a learning-rate reset are
a recipe's ``phases:`` (one phase per round, see recipes/diff-uapa.yaml).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from trl_plus import (
    DiffusionMethod,
    ListField,
    LossContext,
    LossOutput,
    MethodConfig,
    Needs,
    Paper,
    TrlPlusError,
    hookimpl,
)

#: The per-trajectory Beta parameter columns (α_τ, β_τ of the winner, then the loser).
BETA_FIELDS = ("alpha_w", "beta_w", "alpha_l", "beta_l")


class DiffUAPAConfig(MethodConfig):
    """Diff-UAPA hyperparameters (the paper gives none of them; the card's worked example uses αI = 10, γ = 0.99)."""

    scale: float = Field(10.0, gt=0, description="α_T·I, the scale inside the sigmoid (paper: not found); with "
                                                 "k = 0 it is diffusion-dpo's β")  # fmt: skip
    gamma: float = Field(0.99, gt=0, le=1, description="γ, the discount over a segment's steps (paper: not found)")
    prior: bool = Field(True, description="add the Beta-prior MAP terms (false: Diff-CPL, the paper's baseline)")


def segment_scores(d, gamma: float):
    """``[..., B]`` D(τ) = Σ_t γ^t d_t of per-step scores ``d`` ``[S, ..., B]`` (S = k + 1 steps, first dim)."""
    import torch

    powers = gamma ** torch.arange(d.size(0), dtype=d.dtype, device=d.device)
    return torch.einsum("s,s...->...", powers, d)


def beta_log_density(x, a, b):
    """log Beta(x; a, b), elementwise."""
    import torch

    return (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x) - torch.lgamma(a) - torch.lgamma(b) + torch.lgamma(a + b)


def uapa_losses(d_w, d_l, beta_params, scale: float, gamma: float, prior: bool = True):
    """``(L [B], L_MLE [B], L_prior(τ^w) [B], L_prior(τ^l) [B], ϕ_w [B], ϕ_l [B])`` from per-step scores
    ``d_w``, ``d_l`` ``[S, B]`` (d_t = ℓ_ref − ℓ_θ) and ``beta_params`` = (α_w, β_w, α_l, β_l), each ``[B]``."""
    import torch.nn.functional as F

    big_w, big_l = segment_scores(d_w, gamma), segment_scores(d_l, gamma)
    mle = -F.logsigmoid(-scale * (big_w - big_l))
    mean = (big_w.sum() + big_l.sum()) / (2 * big_w.numel())
    phi_w, phi_l = (-scale * (big_w - mean)).sigmoid(), (-scale * (big_l - mean)).sigmoid()
    if not prior:
        zero = mle.new_zeros(mle.shape)
        return mle, mle, zero, zero, phi_w, phi_l
    a_w, b_w, a_l, b_l = (p.to(mle.dtype) for p in beta_params)
    prior_w = -beta_log_density(phi_w, a_w + 1, b_w + 1)
    prior_l = -beta_log_density(phi_l, a_l + 1, b_l + 1)
    return mle + prior_w + prior_l, mle, prior_w, prior_l, phi_w, phi_l


class DiffUAPA(DiffusionMethod):
    """Trajectory-level Diffusion-DPO (discounted, per-step shared draws) plus a Beta-prior MAP term per trajectory."""

    name = "diff-uapa"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "data.quality": ("noise",), "property": (), "scope": "policy", "source": "inferred"}  # fmt: skip
    family = "policy-rl"
    paper = Paper("Uncertainty-Aware Preference Alignment for Diffusion Policies", None,
                  venue="NeurIPS (listed); read as an anonymous ICML-format submission")
    summary = ("−log σ(−αI·(D(τ^w) − D(τ^l))) + Σ_τ −log Beta(ϕ(τ); α_τ+1, β_τ+1), D(τ) = Σ_t γ^t (ℓ_ref − ℓ_θ)_t "
               "over trajectory segments")  # fmt: skip
    needs = Needs(reference="yes", precomputable_reference=False, fields=BETA_FIELDS,
                  list_fields=(ListField("chosen", dtype="text"),
                               ListField("rejected", dtype="text", same_length_as="chosen")))  # fmt: skip
    Config = DiffUAPAConfig
    data_fields = ("prompt",)
    image_fields = ("chosen", "rejected")
    batch_fields = BETA_FIELDS
    example_data = {"path": "recipes/data/diff_uapa_segments.jsonl"}

    def images(self, row: dict[str, Any]) -> list[str]:
        """The winner segment's k+1 images, then the loser's."""
        return [*_listed(row["chosen"]), *_listed(row["rejected"])]

    def prepare_split(self, dataset: Any, recipe: Any, split: str) -> Any:
        """The core's image checks, then: both segments of a row have the same number of steps, every row the
        same number, and the Beta parameters are numbers ≥ 0 (one line naming the row)."""
        source = f"{getattr(recipe, '_source', '<recipe>')}: data.{split}"
        missing = [c for c in BETA_FIELDS if c not in dataset.column_names]
        if missing:
            raise TrlPlusError(f"{source}: no {missing[0]} column: each row needs the Beta parameters "
                               f"{', '.join(BETA_FIELDS)} (0 for all four: Diff-CPL, no prior)")  # fmt: skip
        dataset = super().prepare_split(dataset, recipe, split)
        steps = None
        for i, row in enumerate(dataset):
            w, lose = len(_listed(row["chosen"])), len(_listed(row["rejected"]))
            if w != lose or w == 0:
                raise TrlPlusError(f"{source}: row {i + 1}: chosen has {w} steps and rejected {lose}: a pair's "
                                   "segments need the same k + 1 ≥ 1 steps")  # fmt: skip
            if steps is not None and w != steps:
                raise TrlPlusError(f"{source}: row {i + 1}: {w} steps per segment, but row 1 has {steps}: one "
                                   "segment length k + 1 per split")  # fmt: skip
            steps = w
            for name in BETA_FIELDS:
                value = row[name]
                if not isinstance(value, (int, float)) or value < 0:
                    raise TrlPlusError(f"{source}: row {i + 1}: {name} must be a number ≥ 0 (a Beta network's "
                                       f"output), got {value!r}")  # fmt: skip
        return dataset

    def score(self, trainer: Any, inputs: Any, model: Any = None, generator: Any = None) -> Any:
        """The trainer's DenoisingScorer with one (t, ε) draw per (example, step index): step t of the winner and
        of the loser share it, the steps of a segment do not (with k = 0: exactly diffusion-dpo's draws)."""
        import torch

        group, prompt_ids, k = inputs["group"], inputs["prompt_ids"], inputs["num_sequences"]
        b, steps = prompt_ids.size(0), k // 2
        x0 = trainer.clean_latents(inputs, generator)
        dropout = trainer.args.caption_dropout
        if dropout > 0 and model.training:  # as the trainer: one draw per example
            drop = torch.rand(prompt_ids.shape, generator=generator) < dropout
            prompt_ids = torch.where(drop.to(prompt_ids.device), torch.zeros_like(prompt_ids), prompt_ids)
        dtype = trainer.denoiser_dtype(model)
        cond = trainer.conditioning(prompt_ids, group, dtype, x0.device)
        step = torch.arange(k, device=group.device).repeat_interleave(b) % steps  # rows are sequence-major
        shared = group * steps + step
        reference = None if trainer.reference_mode == "none" else trainer.reference_errors
        return trainer.scorer.score(model, x0.to(dtype), shared, b * steps, cond, reference, generator)

    def loss(self, ctx: LossContext) -> LossOutput:
        """The batch mean of L_MLE + L_prior(τ^w) + L_prior(τ^l); logs each term and the mean ϕ of winners."""
        d = ctx.ref_logps() - ctx.logps()  # [K, B]: d_t = ℓ_ref − ℓ_θ (= w(t)·(ē_θ − ē_ref))
        steps = d.size(0) // 2
        if d.size(0) != 2 * steps or steps == 0:
            raise TrlPlusError(f"diff-uapa: {d.size(0)} scores per example; expected 2(k + 1): the winner segment's "
                               "steps, then the loser's")  # fmt: skip
        params = [ctx.batch[name] if name in ctx.batch else d.new_zeros(d.size(1)) for name in BETA_FIELDS]
        total, mle, prior_w, prior_l, phi_w, phi_l = uapa_losses(d[:steps], d[steps:], params, self.config.scale,
                                                                 self.config.gamma, self.config.prior)  # fmt: skip
        return LossOutput(loss=total.mean(), rewards=-self.config.scale * d.detach(),
                          metrics={"uapa/mle": mle.detach().mean(), "uapa/prior": (prior_w + prior_l).detach().mean(),
                                   "uapa/phi_chosen": phi_w.detach().mean(),
                                   "uapa/accuracy": (phi_w > phi_l).float().mean()})  # fmt: skip


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@hookimpl
def register_methods(register):
    register(DiffUAPA)
