"""The real-image quickstart (trl_plus.diffusion.digits; recipes/quickstart-diffusion*.yaml): its data are the real
digits of the scikit-learn wheel, written deterministically; the ``tiny-digits`` pipeline; and the learning test of
issue 21 — diffusion-dpo from a cached SFT reference raises held-out implicit-reward accuracy from exactly 0.5 to
≥ 0.8 *together with* the fidelity guard (held-out denoising error ≤ 1.2 × the reference's, samples' class
consistency ≥ the reference's − 0.05), on the quickstart's own recipes; and issue 19's online variant (D3PO on its
own samples, rewarded by their brightness: every same-seed sample gets brighter, the guard holds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_plus import train
from trl_plus.diffusion.digits import (
    TRAIN,
    format_figures,
    ink,
    load_digits,
    quickstart_report,
    split,
    to_unit,
    write_digits_data,
)

ROOT = Path(__file__).resolve().parents[1]
SFT_RECIPE = ROOT / "recipes" / "quickstart-diffusion-sft.yaml"
DPO_RECIPE = ROOT / "recipes" / "quickstart-diffusion.yaml"
ONLINE_RECIPE = ROOT / "recipes" / "quickstart-diffusion-online.yaml"


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, write_digits_data(out)


def test_the_digits_are_the_wheels_real_images():
    pixels, labels = load_digits()
    assert pixels.shape == (1797, 8, 8) and pixels.max() == 16 and pixels.min() == 0
    assert sorted(set(labels.tolist())) == list(range(10))
    train_index, held_out = split(len(pixels))
    assert len(train_index) == TRAIN and len(held_out) == 397 and not set(train_index) & set(held_out)


def test_data_files_are_deterministic_and_pairs_follow_the_rule(digits_data, tmp_path):
    out, files = digits_data
    again = write_digits_data(tmp_path)
    for key in files:
        assert Path(files[key]).read_text() == Path(again[key]).read_text()
    pixels, labels = load_digits()
    values = ink(to_unit(pixels))
    train_index, held_out = (set(s.tolist()) for s in split(len(pixels)))

    def index(path):
        return int(Path(path).stem)

    sft = rows(files["sft"])
    assert len(sft) == TRAIN and {index(r["image"]) for r in sft} == train_index
    for key, allowed in (("pairs", train_index), ("held_out", held_out)):
        pairs = rows(files[key])
        assert len(pairs) == (3000 if key == "pairs" else 300) and len({(p["chosen"], p["rejected"]) for p in pairs}) == len(pairs)
        for pair in pairs:
            a, b = index(pair["chosen"]), index(pair["rejected"])
            assert {a, b} <= allowed  # held-out pairs never reuse a training image
            assert labels[a] == labels[b] and pair["prompt"] == f"digit {labels[a]}"
            assert values[a] >= values[b] + 0.15
    from PIL import Image

    image = Image.open(out / "images" / "0000.png")
    assert image.size == (8, 8) and image.mode == "L"


def test_tiny_digits_pipeline_is_a_pixel_space_unet(tmp_path):
    from trl_plus.config import ModelSpec
    from trl_plus.diffusion.models import load_diffusion
    from trl_plus.models.load import resolve_model_path

    spec = ModelSpec(kind="diffusion", name_or_path="tiny-digits", dtype="float32")
    bundle = load_diffusion(spec, resolve_model_path("tiny-digits"))
    assert bundle.vae is None and bundle.kind == "unet"
    assert bundle.denoiser.config.in_channels == 1 and bundle.denoiser.config.sample_size == 8
    assert sum(p.numel() for p in bundle.denoiser.parameters()) == 202_337


@pytest.fixture(scope="module")
def sft_reference(digits_data):
    """The quickstart's stage 1 as its recipe says (the SFT reference), built once per machine in the trl-plus cache
    (keyed by the recipe's and the data's bytes): a complete pipeline folder."""
    import hashlib

    from trl_plus.models.cache import build_once, cache_dir

    out, files = digits_data
    digest = hashlib.sha256(SFT_RECIPE.read_bytes() + Path(files["sft"]).read_bytes()).hexdigest()[:12]

    def build(folder):
        train(SFT_RECIPE, [f"data.train.path={files['sft']}", f"training.output_dir={folder}",
                           "training.save_strategy='no'", "training.report_to=none"])  # fmt: skip

    return build_once(cache_dir() / "models" / f"digits-sft-{digest}", build, marker="model_index.json")


@pytest.mark.slow
def test_dpo_on_real_digits_learns_and_keeps_the_fidelity_guard(digits_data, sft_reference, tmp_path):
    out, files = digits_data
    run = tmp_path / "dpo"
    result = train(DPO_RECIPE, [f"model.name_or_path={sft_reference}", f"data.train.path={files['pairs']}",
                                f"data.eval.path={files['held_out']}", f"training.output_dir={run}",
                                "training.save_strategy='no'", "training.eval_strategy='no'"])  # fmt: skip
    assert result.global_step == 75
    figures = quickstart_report(sft_reference, run, out, samples=200, grid=tmp_path / "grid.png")
    reference, policy = figures["reference"], figures["policy"]
    table = format_figures(figures)
    assert reference.implicit_accuracy == 0.5, table  # policy = reference: every pair a tie
    assert reference.class_consistency >= 0.6, table  # the reference is a real class-conditional generator
    assert policy.implicit_accuracy >= 0.8, table
    assert policy.held_out_mse <= 1.2 * reference.held_out_mse, table
    assert policy.class_consistency >= reference.class_consistency - 0.05, table
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_d3po_online_on_real_digits_brightens_its_own_samples_and_keeps_the_fidelity_guard(digits_data, sft_reference,
                                                                                           tmp_path):  # fmt: skip
    """Issue 19's generation-side learning test on real images: D3PO, rewarded by the brightness of its own samples,
    makes every same-seed sample brighter (measured at 20 steps: mean ink −0.3803 -> −0.3576, class consistency
    0.880 -> 0.870, held-out error 0.0809 -> 0.0808)."""
    pytest.importorskip("trl_plus_d3po")
    out, _ = digits_data
    run = tmp_path / "d3po"
    result = train(ONLINE_RECIPE, [f"model.name_or_path={sft_reference}", f"training.output_dir={run}",
                                   "training.max_steps=20"])  # fmt: skip
    assert result.global_step == 20
    figures = quickstart_report(sft_reference, run, out, samples=200)
    reference, policy = figures["reference"], figures["policy"]
    table = format_figures(figures)
    assert policy.brighter >= 0.9 and policy.sample_ink > reference.sample_ink + 0.01, table
    assert policy.class_consistency >= reference.class_consistency - 0.05, table
    assert policy.held_out_mse <= 1.2 * reference.held_out_mse, table
