"""The real-image quickstart: the 1,797 handwritten digits (8×8, 17 grey levels) that the scikit-learn wheel ships
as ``sklearn/datasets/data/digits.csv.gz`` (the test set of the UCI "Optical Recognition of Handwritten Digits" data,
BSD-3-Clause with the package). Read with numpy alone: scikit-learn is installed ``--no-deps`` and never imported.

Why these images: they come from PyPI like SmolLM2 (no hub, no download at run time), are small enough for a CPU
(8×8 pixels, so the denoiser runs in pixel space without a VAE), and are real handwriting with ten labelled classes,
which gives the fidelity guard a meaning: a nearest-class-mean classifier of the real digits (0.90 on held-out digits)
tells whether samples still look like the digit their prompt names. Debian's Fashion-MNIST (28×28, 60,000 images)
would be the step up; it is not on PyPI.

Pieces:

- :func:`write_digits_data` writes the images as PNG files and the JSONL files of the two quickstart stages
  (``sft.jsonl``: prompt "digit c" and one image; ``pairs.jsonl`` / ``pairs-heldout.jsonl``: preference pairs of one
  class, chosen = the image with more ink, i.e. a higher mean pixel value, by at least ``min_gap``).
- :func:`save_digits_pipeline` builds the ``tiny-digits`` alias: a (16, 32)-channel ``UNet2DConditionModel`` on
  8×8×1 pixels, the tiny frozen random CLIP text encoder of ``tiny-sd`` and a 1000-step DDPM scheduler, saved as a
  ``StableDiffusionPipeline`` without a VAE.
- :func:`quickstart_report` compares a reference and a policy pipeline folder: held-out implicit-reward accuracy on
  fixed draws, held-out denoising error, the same-seed samples' ink and class consistency; it writes a PNG grid.

``python -m trl_plus.diffusion.digits data DIR`` and ``... report REFERENCE POLICY DATA_DIR`` are what
``make quickstart-diffusion`` runs around its two ``trl-plus train`` stages.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrlPlusError, quiet_known_noise

DIGITS_PIP = "pip install --no-deps scikit-learn==1.9.1"
#: Images per split: the first ``TRAIN`` of a seeded permutation train, the other 397 are held out.
TRAIN = 1400
PROMPT = "digit {}"


def digits_file() -> Path:
    """The digits CSV inside the installed scikit-learn package (found, not imported)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise TrlPlusError(f"the digits quickstart reads its images from the scikit-learn wheel: {DIGITS_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise TrlPlusError(f"{path} is missing from the installed scikit-learn; reinstall it: {DIGITS_PIP}")
    return path


def load_digits():
    """``(pixels, labels)``: ``[1797, 8, 8]`` uint8 grey levels 0..16 and ``[1797]`` int64 classes 0..9."""
    import numpy as np

    with gzip.open(digits_file(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :64].reshape(-1, 8, 8).astype(np.uint8), table[:, 64].astype(np.int64)


def split(count: int, seed: int = 0):
    """``(train, held_out)`` index arrays of a seeded permutation of ``count`` images (``TRAIN`` train)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(count)
    return order[:TRAIN], order[TRAIN:]


def ink(pixels) -> Any:
    """Mean pixel value per image in [-1, 1] (the preference rule: more ink is preferred)."""
    return pixels.reshape(pixels.shape[0], -1).mean(-1)


def to_unit(levels):
    """Grey levels 0..16 -> [-1, 1] floats, as the trainer reads the PNG files (``load_image``)."""
    import numpy as np

    return np.round(levels.astype(np.float32) * 255 / 16) / 127.5 - 1.0


def _pairs(index, labels, values, count: int, min_gap: float, rng) -> list[tuple[int, int]]:
    """``count`` pairs (chosen, rejected) of the same class from ``index`` with chosen's ink ≥ rejected's + min_gap."""
    pairs, seen = [], set()
    by_class = {c: index[labels[index] == c] for c in range(10)}
    attempts = 0
    while len(pairs) < count and attempts < 200 * count:
        attempts += 1
        members = by_class[int(rng.integers(10))]
        a, b = (int(i) for i in rng.choice(members, 2, replace=False))
        if values[a] < values[b]:
            a, b = b, a
        if values[a] - values[b] >= min_gap and (a, b) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    return pairs


def write_digits_data(out_dir: str | Path, *, train_pairs: int = 3000, held_out_pairs: int = 300,
                      min_gap: float = 0.15, seed: int = 0) -> dict[str, str]:  # fmt: skip
    """Write ``images/NNNN.png`` (all 1,797), ``sft.jsonl`` (the train images), ``pairs.jsonl`` and
    ``pairs-heldout.jsonl`` (ink pairs from the train / held-out images) under ``out_dir``; returns their paths.
    Deterministic in ``seed``; a second call with the same arguments rewrites the same files."""
    import numpy as np
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pixels, labels = load_digits()
    for i, image in enumerate(pixels):
        path = out / "images" / f"{i:04d}.png"
        if not path.is_file():
            Image.fromarray(np.round(image.astype(np.float32) * 255 / 16).astype(np.uint8), mode="L").save(path)
    train, held_out = split(len(pixels), seed)
    values = ink(to_unit(pixels))
    rng = np.random.default_rng(seed + 1)

    def row(i):
        return f"images/{i:04d}.png"

    files = {"sft": out / "sft.jsonl", "pairs": out / "pairs.jsonl", "held_out": out / "pairs-heldout.jsonl"}
    lines = {
        "sft": [{"prompt": PROMPT.format(labels[i]), "image": row(i)} for i in train],
        "pairs": [{"prompt": PROMPT.format(labels[a]), "chosen": row(a), "rejected": row(b)}
                  for a, b in _pairs(train, labels, values, train_pairs, min_gap, rng)],
        "held_out": [{"prompt": PROMPT.format(labels[a]), "chosen": row(a), "rejected": row(b)}
                     for a, b in _pairs(held_out, labels, values, held_out_pairs, min_gap, rng)],
    }  # fmt: skip
    for key, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in lines[key]))
    return {key: str(path) for key, path in files.items()}


def digits_unet(seed: int = 0):
    """The ``tiny-digits`` denoiser: a (16, 32)-channel UNet2DConditionModel on 8×8×1 pixels (202,337 parameters)."""
    from .tiny import tiny_unet

    return tiny_unet(in_channels=1, sample_size=8, seed=seed, block_out_channels=(16, 32), norm_num_groups=8,
                     attention_head_dim=8)  # fmt: skip


def save_digits_pipeline(directory: str | Path, seed: int = 0) -> str:
    """Write the ``tiny-digits`` pipeline (``StableDiffusionPipeline`` without a VAE: the UNet denoises pixels)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from .tiny import _text_parts

    unet = digits_unet(seed)
    torch.manual_seed(seed + 1)
    tokenizer, (text_encoder,) = _text_parts(projection=False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    pipeline = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    pipeline.save_pretrained(str(directory))
    return str(directory)


# -- the report -----------------------------------------------------------------------------------------------------
@dataclass
class Figures:
    """One model's quickstart figures (see :func:`quickstart_report`)."""

    implicit_accuracy: float
    held_out_mse: float
    class_consistency: float
    sample_ink: float
    brighter: float  # share of its samples with more ink than the reference's same-seed sample


class NearestMean:
    """The fidelity guard's classifier: the nearest class mean of the real train digits (0.902 on held-out ones)."""

    def __init__(self, images, labels):
        import torch

        self.means = torch.stack([images[labels == c].mean(0) for c in range(10)])

    def __call__(self, images):
        return ((images[:, None] - self.means[None]) ** 2).flatten(2).sum(-1).argmin(1)


def _load(folder: str | Path):
    """A pipeline folder -> (denoiser, scheduler, text embeddings function)."""
    import torch
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(folder), vae=None, safety_checker=None, feature_extractor=None)
    pipeline.set_progress_bar_config(disable=True)
    unet = pipeline.unet.eval().requires_grad_(False)

    @torch.no_grad()
    def embed(prompts):
        return pipeline.encode_prompt(prompts, "cpu", 1, False)[0]

    return unet, pipeline.scheduler, embed


def _pair_errors(unet, scheduler, images, text, draws: int, seed: int):
    """``[2P]`` mean ε-prediction error ē of ``unet`` on ``images`` (P winners, then their P losers) over ``draws``
    seeded draws of the core's :class:`~trl_plus.diffusion.scorer.DenoisingScorer`, (t, ε) shared by each pair."""
    import torch

    from .scorer import DenoisingScorer

    scorer = DenoisingScorer(scheduler)
    pairs = images.size(0) // 2
    group = torch.arange(pairs).repeat(2)
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(images.size(0), dtype=torch.float64)
    with torch.no_grad():
        for _ in range(draws):
            noised = scorer.forward_noise(images, group, pairs, generator)
            total += scorer.errors(unet, noised, {"text": text}).double()
    return total / draws


def quickstart_report(reference: str | Path, policy: str | Path, data_dir: str | Path, *, samples: int = 200,
                      draws: int = 8, steps: int = 25, seed: int = 0, grid: str | Path | None = None) -> dict:  # fmt: skip
    """The quickstart's table as a dict ``{"reference": Figures, "policy": Figures}`` (and the grid PNG written):

    - implicit-reward accuracy on the held-out pairs, with (t, ε) shared by the images of a pair and the same
      ``draws`` seeded draws for both models (ties, as at policy = reference, count ½);
    - held-out denoising error: mean ε error over the held-out images (``draws`` seeded draws each);
    - ``samples`` DDIM samples (``steps`` steps, η = 0), prompt "digit c" for c = i mod 10, the same seeds for both
      models: their mean ink, the share brighter than the reference's same-seed sample, and class consistency under
      :class:`NearestMean`.
    """
    import torch

    from ..builtin.metrics import pair_accuracy
    from .data import load_image
    from .inversion import ddim_sample

    data_dir = Path(data_dir)
    pixels, labels = load_digits()
    train, _ = split(len(pixels), seed)
    images = torch.from_numpy(to_unit(pixels)).unsqueeze(1)
    classify = NearestMean(images[train], torch.from_numpy(labels[train]))
    pairs = [json.loads(line) for line in (data_dir / "pairs-heldout.jsonl").read_text().splitlines()]
    chosen = torch.stack([load_image(str(data_dir / p["chosen"]), None, 1) for p in pairs])
    rejected = torch.stack([load_image(str(data_dir / p["rejected"]), None, 1) for p in pairs])
    classes = torch.arange(samples) % 10
    start = torch.randn((samples, 1, 8, 8), generator=torch.Generator().manual_seed(seed + 2))
    models = {"reference": _load(reference), "policy": _load(policy)}
    results, pictures, margins = {}, {}, {}
    for name, (unet, scheduler, embed) in models.items():
        text = embed([p["prompt"] for p in pairs])
        both = torch.cat([chosen, rejected])
        errors = _pair_errors(unet, scheduler, both, torch.cat([text, text]), draws, seed + 3)
        margins[name] = errors[len(pairs):] - errors[:len(pairs)]  # ē_l − ē_w: > 0 when the winner is denoised better
        mse = errors.mean().item()
        cond = {"text": embed([PROMPT.format(int(c)) for c in range(10)])[classes]}
        with torch.no_grad():
            x = ddim_sample(unet, start.clone(), cond, scheduler, steps).clamp(-1, 1)
        pictures[name] = x
        results[name] = [mse, (classify(x) == classes).float().mean().item(), ink(x.numpy()).mean().item()]
    figures = {}
    reference_ink = ink(pictures["reference"].numpy())
    for name, (mse, consistency, mean_ink) in results.items():
        delta = margins[name] - margins["reference"]  # the implicit reward's sign: policy's margin gain over the ref's
        accuracy = pair_accuracy(delta, torch.zeros_like(delta)).mean().item()  # ties (policy = reference) ½
        brighter = float((ink(pictures[name].numpy()) > reference_ink).mean())
        figures[name] = Figures(accuracy, mse, consistency, mean_ink, brighter)
    if grid is not None:
        write_grid(pictures["reference"], pictures["policy"], grid)
    return figures


def write_grid(reference, policy, path: str | Path, columns: int = 10, rows: int = 4, scale: int = 6) -> str:
    """A PNG of same-seed samples: ``rows`` rows of the reference's above the same rows of the policy's (one column
    per prompt class 0..9), separated by a white line, each pixel ``scale``×``scale``."""
    return write_blocks([reference, policy], path, columns, rows, scale)


def same_seed_samples(folder: str | Path, samples: int = 200, steps: int = 25, seed: int = 0):
    """``[samples, 1, 8, 8]`` the report's DDIM samples (η = 0, ``steps`` steps) of a digits pipeline folder: prompt
    "digit c" for c = i mod 10, the start noise seeded by ``seed`` as :func:`quickstart_report` draws it."""
    import torch

    from .inversion import ddim_sample

    unet, scheduler, embed = _load(folder)
    classes = torch.arange(samples) % 10
    start = torch.randn((samples, 1, 8, 8), generator=torch.Generator().manual_seed(seed + 2))
    cond = {"text": embed([PROMPT.format(int(c)) for c in range(10)])[classes]}
    with torch.no_grad():
        return ddim_sample(unet, start, cond, scheduler, steps).clamp(-1, 1)


def write_blocks(blocks, path: str | Path, columns: int = 10, rows: int = 4, scale: int = 6) -> str:
    """A PNG of blocks of same-seed samples stacked top to bottom (``rows`` rows of ``columns`` each, one column per
    prompt class), separated by white lines, each pixel ``scale``×``scale``."""
    import numpy as np
    from PIL import Image

    def block(images):
        tiles = images[: rows * columns, 0].numpy()
        tiles = ((tiles + 1) * 127.5).clip(0, 255).astype(np.uint8)
        padded = np.pad(tiles, ((0, 0), (1, 1), (1, 1)), constant_values=64)
        lines = [np.concatenate(list(padded[r * columns:(r + 1) * columns]), axis=1) for r in range(rows)]
        return np.concatenate(lines, axis=0)

    parts = [block(images) for images in blocks]
    gap = np.full((2, parts[0].shape[1]), 255, dtype=np.uint8)
    stacked = [piece for part in parts for piece in (part, gap)][:-1]
    picture = np.concatenate(stacked, axis=0).repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(picture, mode="L").save(path)
    return str(path)


def format_figures(figures: dict[str, Figures]) -> str:
    """The report as a plain-text table (one column per model)."""
    rows = [
        ("implicit_accuracy", "held-out implicit-reward accuracy", "{:.3f}"),
        ("held_out_mse", "held-out denoising error (fidelity)", "{:.4f}"),
        ("class_consistency", "samples' class consistency (fidelity)", "{:.3f}"),
        ("sample_ink", "samples' mean ink (the rule)", "{:+.4f}"),
        ("brighter", "samples brighter than same-seed ref", "{:.3f}"),
    ]
    names = list(figures)
    lines = [f"{'':40}" + "".join(f"{n:>11}" for n in names)]
    for key, label, fmt in rows:
        lines.append(f"{label:40}" + "".join(f"{fmt.format(getattr(figures[n], key)):>11}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``data DIR`` | ``report REFERENCE POLICY DATA_DIR [GRID.png]``."""
    quiet_known_noise()  # as the trl-plus command does
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["data"] and len(argv) == 2:
        for key, path in write_digits_data(argv[1]).items():
            print(f"{key:9} {path}")
        return 0
    if argv[:1] == ["report"] and len(argv) in (4, 5):
        grid = argv[4] if len(argv) == 5 else str(Path(argv[2]) / "samples.png")
        figures = quickstart_report(argv[1], argv[2], argv[3], grid=grid)
        print(format_figures(figures))
        print(f"same-seed samples (top 4 rows: reference; bottom 4: policy): {grid}")
        return 0
    print("usage: python -m trl_plus.diffusion.digits data DIR | report REFERENCE POLICY DATA_DIR [GRID.png]",
          file=sys.stderr)  # fmt: skip
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TrlPlusError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
