"""SSDPO (Self-DPO, "SUDO") — Self-Supervised Direct Preference Optimization for Text-to-Image Diffusion Models
(NeurIPS 2025; arXiv 2504.14534; official code SPengLiang/SUDO ``train.py``, read). Diffusion-DPO whose loser is
manufactured: each row is an ordinary (prompt, image) pair, and the collator pairs every winner with another row's
image of the batch, so no preference data is needed; an SFT term on the winner is added:

    L = λ1 · mean ē_θ^w  +  λ2 · mean −log σ(−(β/2)·[(ē_θ^w − ē_ref^w) − (ē_θ^sl − ē_ref^sl)])

with t and ε shared by the winner and its loser (the official code: ``chunk(2)[0].repeat(2)``), β = 5000 and
λ1 = λ2 = ½ (``loss = 0.5*dpo_loss + 0.5*model_losses_w.mean()``). The official loser is ``good[randperm(B)]``, a
permutation that may map a row to itself (then that pair is a constant log 2); ``loser_draw: derangement`` (the
default here) never does, ``permutation`` is the official draw.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from trl_plus import (
    DiffusionDPO,
    DiffusionDPOConfig,
    LossContext,
    LossOutput,
    Paper,
    TrlPlusError,
    denoising_errors,
    hookimpl,
)


class SSDPOConfig(DiffusionDPOConfig):
    """SSDPO hyperparameters: Diffusion-DPO's β plus the two weights."""

    sft_weight: float = Field(0.5, ge=0, description="λ1, weight of the winner's denoising (MSE) loss (paper: 0.5)")
    dpo_weight: float = Field(0.5, ge=0, description="λ2, weight of the Self-DPO term (paper: 0.5)")
    loser_draw: Literal["derangement", "permutation"] = Field(
        "derangement", description="loser = another row (derangement) or good[randperm] (official; may be itself)")


def derangement(size: int, generator=None):
    """A random permutation of ``range(size)`` with no fixed point (a cyclic shift by 1..size−1, so uniform over
    shifts, not over all derangements): row i's loser is row perm[i] ≠ i."""
    import torch

    if size < 2:
        raise TrlPlusError("ssdpo pairs each image with another row's image: use per_device_train_batch_size >= 2")
    shift = int(torch.randint(1, size, (1,), generator=generator))
    return (torch.arange(size) + shift) % size


class RandomLoserCollator:
    """(prompt, image) examples -> pairs: winners are the batch's images, losers the same images deranged; both
    keep the winner's prompt (the loser does not match it: the contrast SSDPO learns from)."""

    def __init__(self, base, draw: str = "derangement"):
        self.base, self.draw = base, draw

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        perm = derangement(len(examples)) if self.draw == "derangement" else torch.randperm(len(examples))
        paired = []
        for i, example in enumerate(examples):
            winner, loser = example["x0"], examples[int(perm[i])]["x0"]
            if isinstance(winner, dict):
                x0 = {key: _stack(winner[key], loser[key]) for key in winner}
            else:
                x0 = _stack(winner, loser)
            paired.append({**example, "x0": x0})
        batch = self.base(paired)
        batch["loser_index"] = perm
        return batch


def _stack(winner, loser):
    import torch

    return torch.cat([winner[:1], loser[:1]])


class SSDPO(DiffusionDPO):
    """Diffusion-DPO against a random other image of the batch, plus ½ SFT on the winner."""

    name = "ssdpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "online", "constraint.reference": "fixed", "property": (),
                "scope": "image", "source": "inferred"}
    paper = Paper("Self-Supervised Direct Preference Optimization for Text-to-Image Diffusion Models", "2504.14534",
                  code="SPengLiang/SUDO")  # fmt: skip
    summary = "Diffusion-DPO with the loser = another row's image (batch derangement) + ½ denoising loss on the winner"
    Config = SSDPOConfig
    data_fields = ("prompt", "image")
    image_fields = ("image",)
    example_data = {"path": "recipes/data/diffusion_pairs.jsonl", "columns": {"image": "chosen"}}

    def batch_collator(self) -> Any:
        """The core's latent collator behind :class:`RandomLoserCollator`."""
        return RandomLoserCollator(super().batch_collator(), self.config.loser_draw)

    def loss(self, ctx: LossContext) -> LossOutput:
        """λ1·mean ē_θ^w + λ2·Diffusion-DPO (logs ``ssdpo/sft`` and ``ssdpo/dpo``)."""
        losses, ratios = self.pair_losses(ctx)
        dpo = losses.mean()
        sft = denoising_errors(ctx)[0][0].mean()
        total = self.config.sft_weight * sft + self.config.dpo_weight * dpo
        return LossOutput(total, rewards=self.config.beta * ratios.detach(),
                          metrics={"ssdpo/sft": sft.detach(), "ssdpo/dpo": dpo.detach()})


@hookimpl
def register_methods(register):
    register(SSDPO)
