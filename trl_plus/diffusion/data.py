"""Image rows, checked before any model loads, and the collator of prepared examples.

A row holds a ``prompt`` and image paths (relative to the data file, or absolute): ``chosen``/``rejected`` for pairs,
other columns for other shapes (``DiffusionMethod.image_fields``). ``data.<split>.label`` names a column in the
official Pick-a-Pic convention (``label_0``: 1 = the first image wins, 0 = the second wins, 0.5 = a tie): 0 swaps the
pair; ties are dropped (``data.ties: drop``, the official choice) or kept as soft labels (``keep_as_soft``: the
batch field ``label`` = 0.5, cDPO-style smoothing by methods that read it).

Ready latents: a path ending in ``.pt`` / ``.npy`` / ``.safetensors`` (:data:`LATENT_SUFFIXES`) is a latent file —
one tensor ``[C, h, w]`` (an image) or ``[C, F, h, w]`` (a video: F latent frames), already scaled/normalised as
the pipeline's denoiser sees latents (a ``.safetensors`` file holds it under the key ``latents``). It is used as
x0 as it is (no VAE); the rows' checks load it (shape, finite values, one shape for the split) before any model
loads. Video methods score per segment of latent frames (:func:`segment_ids`, ``Scoring.segments``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.load import _rows, looks_local
from ..errors import TrlPlusError

#: The collated batch keys of the diffusion trainer.
X0, PROMPT_IDS, GROUP, NUM_SEQUENCES = "x0", "prompt_ids", "group", "num_sequences"
#: An example's stored sampler steps (``Scoring.source = "transitions"``): ``{"x_t", "x_prev", "timestep",
#: "prev_timestep"}`` ``[K, ...]``, collated to ``transition_<key>`` ``[K*B, ...]``.
TRANSITION = "transition"
#: The batch key of an online method's micro-batch: the prompt rows the rollout stage samples.
PROMPT_ROWS = "prompt_rows"
#: An image column's batch field for soft labels (``ties: keep_as_soft``): 1.0 = decisive, 0.5 = a tie.
SOFT_LABEL = "label"


#: Suffixes of ready-latent files (read by :func:`load_latent`).
LATENT_SUFFIXES = (".pt", ".npy", ".safetensors")


def is_latent_file(path: str | Path) -> bool:
    """Whether ``path`` names a ready-latent file (by its suffix, :data:`LATENT_SUFFIXES`)."""
    return str(path).lower().endswith(LATENT_SUFFIXES)


def load_latent(path: str | Path):
    """The float32 tensor of a latent file (``.pt``: ``torch.save`` of one tensor, read with ``weights_only``;
    ``.npy``; ``.safetensors``: the tensor under the key ``latents``). ``ValueError`` with the reason when the file
    holds something else."""
    import torch

    path = str(path)
    if path.lower().endswith(".npy"):
        import numpy as np

        value = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
        if "latents" not in state:
            raise ValueError(f"holds no tensor named 'latents' (keys: {', '.join(state) or 'none'})")
        value = state["latents"]
    else:
        value = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"holds {type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}, not "
                         "one float tensor")  # fmt: skip
    if value.dim() not in (3, 4):
        raise ValueError(f"holds a tensor of shape {tuple(value.shape)}; expected [C, h, w] or [C, F, h, w]")
    if not bool(torch.isfinite(value).all()):
        raise ValueError("holds NaN or infinite values")
    return value.float()


def segment_ids(num_frames: int, lengths: list[int] | None = None, segment_frames: int | None = None) -> list[int]:
    """Each latent frame's segment id (a list of ``num_frames`` ints): consecutive segments of the given
    ``lengths`` (latent frames each; they must add up to ``num_frames``), or of ``segment_frames`` frames each with
    a shorter last one (⌈F/s⌉ segments). ``ValueError`` naming the mismatch."""
    if lengths is None:
        if not segment_frames or segment_frames < 1:
            raise ValueError("give segment lengths or a segment length >= 1 in latent frames")
        return [f // segment_frames for f in range(num_frames)]
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths):
        raise ValueError(f"segment lengths must be positive integers (latent frames), got {lengths!r}")
    if sum(lengths) != num_frames:
        raise ValueError(f"segment lengths {lengths} add up to {sum(lengths)} latent frames, but the latents have "
                         f"{num_frames}")  # fmt: skip
    return [index for index, n in enumerate(lengths) for _ in range(n)]


def _image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of an image file, or ``None`` when PIL cannot read it as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


def check_prompt_rows(dataset: Any, recipe: Any, split: str) -> Any:
    """An online method's rows: each needs a non-empty string ``prompt`` (one line naming the data file and row)."""
    spec = getattr(recipe.data, split)
    source = f"{getattr(recipe, '_source', '<recipe>')}: data.{split} ({spec.path})"
    data_file = spec.path if looks_local(spec.path) and Path(spec.path).is_file() else None
    if "prompt" not in dataset.column_names:
        raise TrlPlusError(f"{source}: an online diffusion method samples its own images: each row needs a 'prompt' "
                           f"column (columns: {', '.join(dataset.column_names)})")  # fmt: skip
    for index, prompt in enumerate(dataset["prompt"]):
        if not isinstance(prompt, str):
            raise TrlPlusError(f"{source}: {_rows([index], data_file)}: 'prompt' must be a string, got {prompt!r}")
    return dataset


def check_image_rows(dataset: Any, method: Any, recipe: Any, split: str) -> Any:
    """``dataset`` with labels applied (swapped pairs, ties dropped or soft) and every image path absolute; one line
    naming the data file and row for an image that does not exist or is not an image, and for images of different
    sizes when ``model.resolution`` is not set (it resizes and center-crops them to one square size)."""
    from datasets import Dataset

    spec = getattr(recipe.data, split)
    source = f"{getattr(recipe, '_source', '<recipe>')}: data.{split} ({spec.path})"
    data_file = spec.path if looks_local(spec.path) and Path(spec.path).is_file() else None
    base = Path(spec.path).expanduser().resolve().parent if data_file else Path.cwd()
    rows = dataset.to_list()
    if spec.label is not None:
        rows = apply_labels(rows, spec.label, recipe.data.ties, method, source, data_file)
    resolution = getattr(recipe.model, "resolution", None)
    first_size: tuple[tuple[int, int], int, str] | None = None
    first_shape: tuple[tuple[int, ...], str] | None = None
    for index, row in enumerate(rows):
        for name in method.image_fields:
            values = row[name] if isinstance(row[name], list) else [row[name]]
            resolved = []
            for value in values:
                if not isinstance(value, str) or not value.strip():
                    raise TrlPlusError(f"{source}: {_rows([row.get('_row', index)], data_file)}: {name!r} must be an "
                                       f"image path, got {value!r}")  # fmt: skip
                path = Path(value).expanduser()
                path = path if path.is_absolute() else base / path
                if not path.is_file():
                    what = "latent" if is_latent_file(path) else "image"
                    raise TrlPlusError(f"{source}: {_rows([row.get('_row', index)], data_file)}: {name}: no such {what} "
                                       f"file: {path}")  # fmt: skip
                if is_latent_file(path):
                    try:
                        shape = tuple(load_latent(path).shape)
                    except Exception as exc:  # noqa: BLE001 - any unreadable file: one line naming it
                        why = str(exc) if isinstance(exc, ValueError) else f"cannot be read ({type(exc).__name__})"
                        raise TrlPlusError(f"{source}: {_rows([row.get('_row', index)], data_file)}: {name}: latent "
                                           f"file {path} {why.splitlines()[0]}") from None  # fmt: skip
                    if first_shape is None:
                        first_shape = (shape, str(path))
                    elif shape != first_shape[0]:
                        raise TrlPlusError(f"{source}: {_rows([row.get('_row', index)], data_file)}: {name}: latent "
                                           f"file {path} has shape {list(shape)} but {first_shape[1]} has "
                                           f"{list(first_shape[0])}: a split's latents need one shape")  # fmt: skip
                    resolved.append(str(path))
                    continue
                size = _image_size(path)
                if size is None:
                    raise TrlPlusError(f"{source}: {_rows([row.get('_row', index)], data_file)}: {name}: {path} is not "
                                       "an image (PIL cannot read it)")  # fmt: skip
                if first_size is None:
                    first_size = (size, index, str(path))
                elif size != first_size[0] and resolution is None:
                    raise TrlPlusError(
                        f"{source}: {_rows([row.get('_row', index)], data_file)}: {name}: {path} is "
                        f"{size[0]}x{size[1]} but {first_size[2]} is {first_size[0][0]}x{first_size[0][1]}: images of "
                        "different sizes need model.resolution (they are resized and center-cropped to it)")
                resolved.append(str(path))
            row[name] = resolved if isinstance(row[name], list) else resolved[0]
    if first_shape is not None and first_size is not None:
        raise TrlPlusError(f"{source}: mixes latent files ({first_shape[1]}) and images ({first_size[2]}): give one "
                           "kind per split")  # fmt: skip
    for row in rows:
        row.pop("_row", None)
    return Dataset.from_list(rows) if rows else dataset.select([])


def apply_labels(rows: list[dict], column: str, ties: str, method: Any, source: str, data_file: str | None) -> list:
    """Pick-a-Pic labels: 1 keeps the pair, 0 swaps it, 0.5 is a tie (dropped, or kept with ``label`` 0.5)."""
    first, second = method.image_fields[:2]
    kept = []
    for index, row in enumerate(rows):
        if column not in row:
            raise TrlPlusError(f"{source}: data has no label column {column!r} (data.*.label); it has "
                               f"{', '.join(row)}")  # fmt: skip
        label = row[column]
        if label not in (0, 1, 0.5):
            raise TrlPlusError(f"{source}: {_rows([index], data_file)}: {column} is {label!r}; expected 1 (the "
                               f"{first} image wins), 0 (the {second} image wins) or 0.5 (a tie)")  # fmt: skip
        row = dict(row, _row=index)
        if label == 0:
            row[first], row[second] = row[second], row[first]
        if label == 0.5 and ties == "drop":
            continue
        row[SOFT_LABEL] = 0.5 if label == 0.5 else 1.0
        kept.append(row)
    if not kept:
        raise TrlPlusError(f"{source}: every row is a tie ({column} = 0.5) and data.ties is drop: nothing to learn")
    return kept


def load_image(path: str, resolution: int | None, channels: int):
    """An image file as a ``[C, H, W]`` float tensor in [-1, 1] (``channels`` 1: grey, 3: RGB), resized (shorter side)
    and center-cropped to ``resolution`` when given."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if resolution is not None:
            width, height = image.size
            scale = resolution / min(width, height)
            image = image.resize((max(resolution, round(width * scale)), max(resolution, round(height * scale))),
                                 Image.BICUBIC)  # fmt: skip
            left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def save_image(pixels, path: str | Path) -> str:
    """Write ``pixels`` ``[C, H, W]`` in [0, 1] (C = 1 grey, 3 RGB, 4 RGBA; other counts: the first three) as an
    8-bit image file (the format from the suffix, PNG for ``.png``); returns the path (the inverse of
    :func:`load_image`'s pixel range, up to the 8-bit rounding)."""
    import torch
    from PIL import Image

    pixels = pixels if pixels.size(0) in (1, 3, 4) else pixels[:3]
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return str(path)


class LatentCollator:
    """Prepared examples (``{"x0": [K, ...] latents or {"mean", "std"}, "prompt_id": int, fields...}``) -> a batch:
    ``x0`` ``[K*B, ...]`` ordered sequence-major (``[img0 ex1..exB, img1 ex1..]``, as the text trainer's rows),
    ``prompt_ids`` ``[B]``, ``group`` ``[K*B]`` (each row's example), ``num_sequences`` K, and ``fields`` as float
    tensors ``[B]`` (a list per row: ``[B, L]``), and the ``segments`` field (``Scoring.segments``) as ``[B, F]`` long.
    Latents stored as a distribution (``mean``/``std``, and ``flip_mean``/``flip_std`` with flips on) are sampled by
    the scorer, per step; ``{"image_id": [K]}`` (images encoded on the fly) becomes ``x0_image_id`` ``[K*B]``: every
    ``x0`` key is stacked the same way."""

    def __init__(self, fields: tuple[str, ...] = (), segments: str | None = None):
        self.fields, self.segments = tuple(fields), segments

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        first = examples[0]["x0"] if X0 in examples[0] else examples[0][TRANSITION]
        batch: dict[str, Any] = {}
        if TRANSITION in examples[0]:  # stored sampler steps (Scoring.source = "transitions")
            for key in first:
                stacked = torch.stack([torch.as_tensor(e[TRANSITION][key]) for e in examples], 1)
                batch[f"{TRANSITION}_{key}"] = stacked.reshape(-1, *stacked.shape[2:])
            k = first["x_t"].size(0)
        elif isinstance(first, dict):
            for key in first:
                stacked = torch.stack([e["x0"][key] for e in examples], 1)  # [K, B, ...]
                batch[f"{X0}_{key}"] = stacked.reshape(-1, *stacked.shape[2:])
            k = next(iter(first.values())).size(0)  # mean/std (a cached distribution) or image_id (on the fly)
        else:
            stacked = torch.stack([e["x0"] for e in examples], 1)
            batch[X0] = stacked.reshape(-1, *stacked.shape[2:])
            k = first.size(0)
        size = len(examples)
        batch[PROMPT_IDS] = torch.tensor([e["prompt_id"] for e in examples], dtype=torch.long)
        batch[GROUP] = torch.arange(size).repeat(k)
        batch[NUM_SEQUENCES] = k
        for name in self.fields + ((SOFT_LABEL,) if SOFT_LABEL in examples[0] else ()):
            batch[name] = torch.tensor([e[name] for e in examples], dtype=torch.float32)  # [B] or [B, K] lists
        if self.segments is not None:  # [B, F] segment id per latent frame (Scoring.segments)
            batch[self.segments] = torch.tensor([e[self.segments] for e in examples], dtype=torch.long)
        return batch


class PromptRowsCollator:
    """An online method's micro-batch: its prepared prompt examples as they are (``{"prompt_rows": [...]}``); the
    rollout stage samples them and collates the rows :meth:`~trl_plus.DiffusionMethod.make_examples` makes."""

    def __call__(self, examples: list[dict]) -> dict:
        return {PROMPT_ROWS: list(examples)}
