"""Where a diffusion run's clean latents come from, and the per-step transforms of a batch before scoring.

- **Latent cache under a byte budget** (``model.cache.latents``): ``true`` keeps every image's VAE latent
  distribution (mean and std, fp32, scaled as the pipeline's latents) in memory, encoded once before training;
  ``false`` keeps only the image paths and re-encodes every batch on the fly (the official Diffusion-DPO code's
  path); ``auto`` (the default) encodes one image, multiplies its bytes by the number of images of the run (train and
  eval) and caches in memory when that fits ``model.cache.latents_budget`` (default 4 GiB), else re-encodes on the
  fly. :func:`plan_latent_cache` decides and says which path it took; the trainer logs it and keeps it as
  ``trainer.latent_cache``. Both paths sample the latent from the same distribution with the same generator draws,
  so they give the same latents for the same seed (up to the VAE's batched-versus-single numerics).
- **Flips** (``training.flip``): random horizontal flips in training, one draw per example (``shared``: its K images
  flip together) or per image (``independent``: the official Diffusion-DPO ``train.py``, whose per-image
  ``RandomHorizontalFlip`` flips winner and loser independently). Flipping a VAE latent is not encoding the flipped
  image (the encoder's convolutions are not mirror-symmetric and its down-sampling pads one side only: on the tiny
  VAE the two differ by 50–77 % of the latent's norm), so with flips on the cache holds both encodings (twice the
  bytes) and the on-the-fly path flips the pixels before encoding, as the official code does. Latents given ready
  (rows with ``x0``) are flipped as tensors: exact in pixel space, an approximation for VAE latents.
- **Draws** (``training.draws: D``): :func:`repeat_draws` repeats every example of a batch D times before scoring, so
  each copy gets its own (t, ε) (and latent sample, flip, caption dropout): the loss sees D×B examples, each in its
  own sigmoid, never D draws summed inside one sigmoid (which would scale β by D).
"""

from __future__ import annotations

from typing import Any

from ..errors import TrlPlusError
from .data import GROUP, PROMPT_IDS

#: ``trainer.latent_cache["mode"]``: latents encoded once and kept in memory, or re-encoded every batch.
MEMORY, ON_THE_FLY = "memory", "on-the-fly"
#: The default ``model.cache.latents_budget``.
DEFAULT_LATENT_BUDGET = 4 * 1024**3
#: A prepared example's ``x0`` key for an image to encode on the fly (an index into the trainer's image list).
IMAGE_ID = "image_id"


def tensor_bytes(value: Any) -> int:
    """The bytes of a tensor or of a dict of tensors (a cached latent distribution)."""
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return value.numel() * value.element_size()


def human_bytes(size: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def plan_latent_cache(setting: str | bool, images: int, bytes_per_image: int | None, budget: int) -> dict[str, Any]:
    """``{"mode", "images", "bytes_per_image", "bytes", "budget", "message"}``: the path a run's latents take
    (``setting``: ``model.cache.latents``; ``images``: how many images the run encodes; ``bytes_per_image``: one
    image's cached encoding, ``None`` when not measured)."""
    total = None if bytes_per_image is None else images * bytes_per_image
    if setting is True:
        mode, why = MEMORY, "model.cache.latents: true"
    elif setting is False:
        mode, why = ON_THE_FLY, "model.cache.latents: false"
    elif setting == "auto":
        fits = total is not None and total <= budget
        mode = MEMORY if fits else ON_THE_FLY
        why = (f"model.cache.latents: auto: {images} images × {human_bytes(bytes_per_image or 0)} = "
               f"{human_bytes(total or 0)} {'<=' if fits else '>'} latents_budget {human_bytes(budget)}")  # fmt: skip
    else:
        raise TrlPlusError(f"model.cache.latents: expected auto, true or false, got {setting!r}")
    where = ("latents encoded once and kept in memory" if mode == MEMORY
             else "images re-encoded by the VAE at every batch")  # fmt: skip
    return {"mode": mode, "images": images, "bytes_per_image": bytes_per_image, "bytes": total, "budget": budget,
            "message": f"{why}: {where}"}


def draw_flips(group, num_groups: int, mode: str, generator=None):
    """``[N]`` bools, True where a row's image is flipped (``None`` for ``mode`` none): one draw per example
    (``shared``: rows of the same ``group`` agree) or per row (``independent``), each with probability ½."""
    import torch

    if mode == "none":
        return None
    if mode == "shared":
        return (torch.rand(num_groups, generator=generator) < 0.5)[group.cpu()]
    return torch.rand(group.numel(), generator=generator) < 0.5


def flip_rows(x, flips):
    """``x`` ``[N, ...]`` with the rows where ``flips`` is True mirrored along the last (width) axis."""
    import torch

    if flips is None:
        return x
    where = flips.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(where, x.flip(-1), x)


def repeat_draws(batch: dict[str, Any], draws: int) -> dict[str, Any]:
    """The collated ``batch`` with each of its B examples repeated ``draws`` times (B' = draws·B, copy d of example
    b at example index d·B + b): every tensor whose first dimension is m·B (m rows per example, sequence-major:
    images, prompt ids, per-example fields) is tiled block by block; ``group`` is renumbered so each copy is its own
    example (its own t, ε); other values are kept."""
    import torch

    if draws == 1:
        return batch
    size = batch[PROMPT_IDS].size(0)
    out = {}
    for key, value in batch.items():
        if key == GROUP:
            per = value.numel() // size
            out[key] = torch.arange(draws * size, device=value.device).repeat(per)
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) % size == 0 and value.size(0):
            blocks = value.reshape(value.size(0) // size, size, *value.shape[1:])
            out[key] = blocks.repeat(1, draws, *([1] * (value.dim() - 1))).reshape(-1, *value.shape[1:])
        else:
            out[key] = value
    return out
