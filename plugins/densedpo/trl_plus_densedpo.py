"""DenseDPO — Fine-Grained Temporal Preference Optimization for Video Diffusion Models (arXiv 2506.03517, NeurIPS
2025; official code not found). Flow-DPO on pairs of videos with a preference label per temporal segment, the
label-signed segment margins summed inside one sigmoid (paper Eq. 7):

    s_f(x^k) = w·[ē_f(G_θ, v^k) − ē_f(G_ref, v^k)]          (ē_f: element mean over the latent frames of segment f)
    L = mean over pairs of −log σ(−β · Σ_f l_f · (s_f(x^0) − s_f(x^1))),   l_f ∈ {+1, −1, 0 (tie)}

with t (logit-normal) and ε shared by the two videos of a pair, x_t = (1 − σ)·x0 + σ·ε, v = ε − x0. w is the
scorer's weight (½ by default: the ½ convention of flow-dpo/diffusion-dpo, so one label for the whole video is
flow-dpo at the same β; ``training.weighting: unit`` gives the paper's printed form without ½). β 500.
"""

from __future__ import annotations

import logging
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
    Scoring,
    TrlPlusError,
    hookimpl,
)

logger = logging.getLogger(__name__)

#: The example field of each latent frame's segment id (``Scoring.segments``).
SEGMENT_IDS = "segment_ids"


class DenseDPOConfig(MethodConfig):
    """DenseDPO hyperparameters."""

    beta: float = Field(500.0, gt=0, description="β in the ½ convention (paper: 500, 'following' Flow-DPO's setting)")
    segment_frames: int = Field(4, ge=1, description="segment length in latent frames when a row gives no segments "
                                                     "(paper: 1 s; Wan 2.1: 16 fps, 4x temporal VAE -> about 4)")


def dense_margins(ctx: LossContext):
    """``[B]`` Σ_f l_f·(ρ_f⁰ − ρ_f¹) per pair, ρ_f = ℓ_θ,f − ℓ_ref,f = −s_f (the per-segment implicit rewards of the
    two videos), over the segments that have latent frames (``ctx.mask``); labels ``ctx.batch["labels"]`` ``[B, S]``."""
    rho = (ctx.token_logps - ctx.ref_token_logps) * ctx.mask  # [2, B, S]
    labels = ctx.batch["labels"].to(device=rho.device, dtype=rho.dtype)
    if labels.shape != rho.shape[1:]:
        raise TrlPlusError(f"densedpo: each pair needs one label per segment: labels are {list(labels.shape)} but the "
                           f"scores are {list(rho.shape[1:])} (pairs x segments); check data labels and segments")
    return (labels * (rho[0] - rho[1])).sum(-1), rho, labels


class DenseCollator:
    """The core's latent collator, with each example's segment ids filled in when the example lacks them (rows built
    in Python: ⌈F/s⌉ segments of ``segment_frames`` latent frames, F = dim 2 of the video latents ``[K, C, F, h, w]``)."""

    def __init__(self, segment_frames: int):
        from trl_plus import LatentCollator

        self.segment_frames = segment_frames
        self.collate = LatentCollator(("labels",), segments=SEGMENT_IDS)

    def __call__(self, examples: list[dict]) -> dict:
        from trl_plus import segment_ids

        filled = []
        for example in examples:
            if SEGMENT_IDS not in example:
                x0 = example["x0"]["mean"] if isinstance(example["x0"], dict) else example["x0"]
                if x0.dim() != 5:
                    raise TrlPlusError(f"densedpo needs video latents [K, C, F, h, w]; got {list(x0.shape)}")
                example = {**example, SEGMENT_IDS: segment_ids(x0.size(2), segment_frames=self.segment_frames)}
            filled.append(example)
        return self.collate(filled)


class DenseDPO(DiffusionMethod):
    """Flow-DPO on video pairs with per-segment labels summed inside one sigmoid; t and ε shared per pair."""

    name = "densedpo"
    taxonomy = {"data.feedback": "pair", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "video", "source": "inferred"}
    family = "flow"
    paper = Paper("DenseDPO: Fine-Grained Temporal Preference Optimization for Video Diffusion Models", "2506.03517")
    summary = "Flow-DPO with per-segment video labels: −log σ(−β Σ_f l_f (s_f⁰ − s_f¹)), s_f per-segment reward"
    Config = DenseDPOConfig
    needs = Needs(reference="yes", precomputable_reference=False,
                  list_fields=(ListField("labels", dtype="int"),
                               ListField("segments", dtype="int", required=False)))  # fmt: skip
    scoring = Scoring(targets=("flow",), share_timestep=True, share_noise=True, segments=SEGMENT_IDS)
    data_fields = ("prompt", "video_0", "video_1")
    image_fields = ("video_0", "video_1")
    batch_fields = ("labels",)
    example_data = {"path": "recipes/data/densedpo_pairs.jsonl"}
    example_model = {"kind": "diffusion", "name_or_path": "tiny-wan"}

    def prepare_split(self, dataset: Any, recipe: Any, split: str) -> Any:
        """Before any model loads: the core's latent-file checks (one shape per split), then per row labels in
        {+1, −1, 0}, segments (the row's ``segments`` lengths in latent frames, else ``segment_frames`` each) that
        cover the latent frames, one label per segment, one segment count per split; all-tie rows are dropped (the
        paper trains on pairs with at least one non-tie segment)."""
        from datasets import Dataset

        from trl_plus import load_latent, segment_ids

        spec = getattr(recipe.data, split)
        where = f"{getattr(recipe, '_source', '<recipe>')}: data.{split} ({spec.path})"
        rows = super().prepare_split(dataset, recipe, split).to_list()
        if not rows:
            return dataset.select([])
        shape = list(load_latent(rows[0]["video_0"]).shape)
        if len(shape) != 4:
            raise TrlPlusError(f"{where}: densedpo needs video latents [C, F, h, w]; {rows[0]['video_0']} holds "
                               f"{shape}")  # fmt: skip
        kept, counts, ties = [], set(), 0
        for index, row in enumerate(rows):
            at = f"{where}: row {index + 1}"
            labels = row["labels"]
            if any(label not in (-1, 0, 1) for label in labels):
                raise TrlPlusError(f"{at}: labels must be +1 (video_0 better on the segment), -1 (video_1 better) or 0 "
                                   f"(a tie); got {labels}")  # fmt: skip
            try:
                ids = segment_ids(shape[1], row.get("segments"), self.config.segment_frames)
            except ValueError as exc:
                raise TrlPlusError(f"{at}: segments: {exc}") from None
            count = max(ids) + 1
            if len(labels) != count:
                how = (f"the row's segments {row['segments']}" if row.get("segments") else
                       f"segments of method_args.segment_frames = {self.config.segment_frames}")  # fmt: skip
                raise TrlPlusError(f"{at}: {len(labels)} labels for {count} segments ({shape[1]} latent frames in "
                                   f"{how}); give one label per segment")  # fmt: skip
            counts.add(count)
            if not any(labels):
                ties += 1
                continue
            kept.append({**row, SEGMENT_IDS: ids})
        if len(counts) > 1:
            raise TrlPlusError(f"{where}: rows have {sorted(counts)} segments; a split needs one segment count (the "
                               "labels of a batch are stacked)")  # fmt: skip
        if not kept:
            raise TrlPlusError(f"{where}: every row's labels are all ties (0): nothing to learn")
        if ties:
            logger.warning(f"{where}: dropped {ties} all-tie rows (no preferred segment)")
        return Dataset.from_list(kept)

    def batch_collator(self) -> Any:
        """The latent collator with per-frame segment ids (``Scoring.segments``) and the labels ``[B, S]``."""
        return DenseCollator(self.config.segment_frames)

    def loss(self, ctx: LossContext) -> LossOutput:
        """−log σ(β·Σ_f l_f (ρ_f⁰ − ρ_f¹)) per pair, averaged; rewards β·Σ_f l_f ρ_f^k (label-signed, so the logged
        accuracy is that of the dense margin), the margin and the accuracy over non-tie segments."""
        import torch.nn.functional as F

        margins, rho, labels = dense_margins(ctx)
        beta = self.config.beta
        loss = -F.logsigmoid(beta * margins).mean()
        signed = (labels * rho).detach()  # [2, B, S]
        decisive = labels != 0
        right = ((labels * (rho[0] - rho[1])) > 0) & decisive
        metrics = {"densedpo/margin": margins.detach().mean(),
                   "densedpo/segment_accuracy": right.sum() / decisive.sum().clamp(min=1)}  # fmt: skip
        return LossOutput(loss, rewards=beta * signed.sum(-1), metrics=metrics)


@hookimpl
def register_methods(register):
    register(DenseDPO)
