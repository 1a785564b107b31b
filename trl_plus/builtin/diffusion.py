"""The core's diffusion methods: ``diffusion-dpo`` (Wallace et al., 2023, arXiv 2311.12908) and ``diffusion-sft``.

``diffusion-dpo`` is DPO's loss, unchanged, on the denoising scorer's ℓ = −½·ē (``DiffusionMethod``): with
ρ = ℓθ − ℓref, z = β·(ρ_w − ρ_l) = −(β/2)·[(ē_θw − ē_θl) − (ē_refw − ē_refl)], the official code's logit
(SalesforceAIResearch/DiffusionDPO ``train.py``: ``scale_term = -0.5 * beta_dpo``), so β keeps the official 5000.
Ties (``label_0`` = 0.5) are dropped by default, as the official data loader does; ``data.ties: keep_as_soft``
keeps them with a per-pair soft label (cDPO smoothing ε = 1 − label, sigmoid loss only).

``diffusion-sft`` is the denoising loss of the official ``--sft`` branch (``F.mse_loss(pred.float(),
target.float())``): the mean ē of one ``image`` per row (map a preference file's winner with
``columns: {image: chosen}``); reference-free. It builds the reference of a preference stage.
"""

from __future__ import annotations

from pydantic import Field

from ..contract import LossContext, LossOutput, MethodConfig, Needs, Paper
from ..diffusion.method import DiffusionMethod
from .dpo import DPO, DPOConfig, dpo_losses

DIFFUSION_DPO_PAPER = Paper("Diffusion Model Alignment Using Direct Preference Optimization", "2311.12908",
                            code="SalesforceAIResearch/DiffusionDPO")  # fmt: skip


class DiffusionDPOConfig(DPOConfig):
    """Diffusion-DPO hyperparameters: DPO's, with the official β."""

    beta: float = Field(5000, gt=0, description="β in the official ½ convention (train.py --beta_dpo 5000; "
                                                "the diffusers SD 1.5 script's 2500 is β/2)")  # fmt: skip


class DiffusionDPO(DiffusionMethod, DPO):
    """DPO's loss on denoising scores: t and ε shared by winner and loser, reference = the initial denoiser."""

    name = "diffusion-dpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "image", "source": "inferred"}
    paper = DIFFUSION_DPO_PAPER
    summary = "DPO on denoising errors: −log σ(−β/2·[(ē_θw − ē_θl) − (ē_refw − ē_refl)]), t and ε shared per pair"
    needs = Needs(reference="yes", precomputable_reference=False)
    Config = DiffusionDPOConfig

    def pair_losses(self, ctx: LossContext):
        """DPO's per-pair losses; pairs kept as ties (``data.ties: keep_as_soft``, batch field ``label`` 0.5) are
        smoothed: −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ) with ε = 1 − label."""
        if "label" not in ctx.batch or self.config.loss_type != "sigmoid":
            return super().pair_losses(ctx)
        import torch.nn.functional as F

        ratios = self.log_ratios(ctx)
        delta = ratios[0] - ratios[1]
        eps = 1 - ctx.batch["label"].to(delta.dtype)
        if not bool((eps > 0).any()):
            return dpo_losses(delta, self.config), ratios
        beta = self.config.beta
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta), ratios


class DiffusionSFTConfig(MethodConfig):
    """diffusion-sft has no hyperparameters of its own: learning rate and steps live in ``training``."""


class DiffusionSFT(DiffusionMethod):
    """The denoising loss on one image per row (mean ē over the batch); reference-free."""

    name = "diffusion-sft"
    taxonomy = {"data.feedback": (), "learning.paradigm": "offline", "constraint.reference": "reference-free",
                "property": (), "scope": "image", "source": "inferred"}
    family = "supervised"
    paper = Paper("Denoising Diffusion Probabilistic Models (the simple loss)", "2006.11239")
    summary = "supervised denoising loss (mean squared error of the prediction) on one image per row"
    needs = Needs(reference="no", precomputable_reference=False)
    Config = DiffusionSFTConfig
    data_fields = ("prompt", "image")
    image_fields = ("image",)
    sequences_per_example = 1
    example_data = {"path": "recipes/data/diffusion_pairs.jsonl", "columns": {"image": "chosen"}}

    def loss(self, ctx: LossContext) -> LossOutput:
        """The batch mean of ē (``sft/mse``, the same value)."""
        mse = ctx.outputs.mse.mean()
        return LossOutput(loss=mse, metrics={"sft/mse": mse.detach()})
