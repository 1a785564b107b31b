"""RankDPO — Scalable Ranked Preference Optimization for Text-to-Image Generation (arXiv 2410.18013, ICCV 2025;
official code not found). Listwise Diffusion-DPO: K images per prompt, each with a gain score ϕ (the fraction of
reward-model comparisons it wins); one t per prompt, ε per image; s_i = e_θ(x_i) − e_ref(x_i) (raw element-mean
errors); every pair a ≻ b (ϕ_a > ϕ_b) weighted LambdaLoss-style:

    G_i = 2^ϕ_i − 1,   D(τ) = log(1 + τ),   Δ_ab = |G_a − G_b| · |1/D(τ_a) − 1/D(τ_b)|
    L = mean over prompts of Σ_{a ≻ b} Δ_ab · −log σ(−β·(s_a − s_b))

τ is the rank by ϕ (1 = best). The paper prints no ½: β here is in the paper's units, so K = 2 with unit weights is
``diffusion-dpo`` at twice this β (the default 2500 is Diffusion-DPO's 5000).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from trl_plus import (
    DiffusionMethod,
    ListField,
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


class RankDPOConfig(MethodConfig):
    """RankDPO hyperparameters (the paper gives no β: Diffusion-DPO's, converted to the paper's units)."""

    beta: float = Field(2500.0, gt=0, description="β without the ½ (paper's units; = Diffusion-DPO's 5000 / 2)")
    pair_weights: Literal["lambda", "unit"] = Field(
        "lambda", description="lambda: |ΔG|·|Δ(1/D)| (paper); unit: every ordered pair weighs 1")


def pair_weights(scores, kind: str = "lambda"):
    """``([B, K, K] weights Δ_ab, [B, K, K] bool a ≻ b)`` from the gain scores ϕ ``[B, K]`` (ranks by ϕ, 1 = best;
    ties in ϕ get no pair)."""
    import torch

    better = scores.unsqueeze(2) > scores.unsqueeze(1)
    if kind == "unit":
        return better.to(scores.dtype), better
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(1, scores.size(1) + 1).expand_as(order))
    gains, inverse_discounts = 2 ** scores - 1, 1 / torch.log1p(ranks.to(scores.dtype))
    delta = (gains.unsqueeze(2) - gains.unsqueeze(1)).abs() * (inverse_discounts.unsqueeze(2)
                                                               - inverse_discounts.unsqueeze(1)).abs()  # fmt: skip
    return delta * better, better


class RankDPO(DiffusionMethod):
    """Listwise Diffusion-DPO over K images per prompt with LambdaLoss pair weights; t shared, ε per image."""

    name = "rankdpo"
    taxonomy = {"data.feedback": "list", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "image", "source": "inferred"}
    paper = Paper("Scalable Ranked Preference Optimization for Text-to-Image Generation", "2410.18013")
    summary = "listwise Diffusion-DPO: Σ_pairs |ΔG|·|Δ(1/log(1+τ))|·−log σ(−β(s_a − s_b)), t shared, ε per image"
    needs = Needs(reference="yes", precomputable_reference=False,
                  list_fields=(ListField("images", dtype="text"), ListField("scores", same_length_as="images")))
    Config = RankDPOConfig
    scoring = Scoring(share_timestep=True, share_noise=False)
    data_fields = ("prompt",)
    image_fields = ("images",)
    batch_fields = ("scores",)
    sequences_per_example = None
    example_data = {"path": "recipes/data/diffusion_lists.jsonl"}

    def prepare_split(self, dataset: Any, recipe: Any, split: str) -> Any:
        """The core's image checks, and one K for the whole split (each row: K images, K scores)."""
        sizes = {(len(row["images"]), len(row["scores"])) for row in dataset}
        if len(sizes) != 1 or len(next(iter(sizes))) != 2 or len(set(next(iter(sizes)))) != 1:
            raise TrlPlusError(f"data.{split}: rankdpo needs every row to hold the same number K >= 2 of images and "
                               f"scores; found (images, scores) lengths {sorted(sizes)}")  # fmt: skip
        if next(iter(sizes))[0] < 2:
            raise TrlPlusError(f"data.{split}: rankdpo needs K >= 2 images per row")
        return super().prepare_split(dataset, recipe, split)

    def loss(self, ctx: LossContext) -> LossOutput:
        """The weighted pairwise sum per prompt, averaged over prompts; logs the weighted pair accuracy."""
        import torch.nn.functional as F

        errors, ref_errors = denoising_errors(ctx)
        s = (errors - ref_errors).transpose(0, 1)  # [B, K]
        weights, better = pair_weights(ctx.batch["scores"].to(s.dtype), self.config.pair_weights)
        margins = s.unsqueeze(2) - s.unsqueeze(1)  # s_a − s_b
        terms = weights * -F.logsigmoid(-self.config.beta * margins)
        loss = terms.sum((1, 2)).mean()
        right = ((margins < 0) & better).to(s.dtype)
        accuracy = (weights * right).sum() / weights.sum().clamp(min=1e-12)
        return LossOutput(loss, metrics={"rankdpo/pair_accuracy": accuracy.detach()})


@hookimpl
def register_methods(register):
    register(RankDPO)
