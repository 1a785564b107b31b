"""The denoising scorer's options (issue 21): ``timestep_sampling: range``, ``weighting: flow_elbo``, flips shared by an
example's images (``training.flip``), several (t, ε) draws per example (``training.draws``) and the latents cached
under a byte budget (``model.cache.latents`` / ``latents_budget``); each option's bad values are one line before any
model loads."""

from __future__ import annotations

import logging
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trl_plus import LossContext, TrlPlusError, load_recipe  # noqa: E402
from trl_plus.diffusion.latents import draw_flips  # noqa: E402
from trl_plus.testing import (  # noqa: E402
    diffusion_batch,
    perturb,
    tiny_diffusion_trainer,
    tiny_text_encoder,
    training_logs,
)

LOG2 = math.log(2)


def seeded(seed: int = 0):
    return torch.Generator().manual_seed(seed)


# -- timesteps and weights ----------------------------------------------------------------------------------------


def test_range_draws_stay_in_the_range_and_cover_it():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from trl_plus.diffusion.scorer import DenoisingScorer

    ddpm = DenoisingScorer(DDPMScheduler(num_train_timesteps=1000), timestep_sampling="range", timestep_range=(100, 300))
    timesteps, t, sigma = ddpm.sample_timesteps(4000, seeded())
    assert sigma is None and torch.equal(timesteps, t)
    assert int(t.min()) == 100 and int(t.max()) == 299  # [lo, hi): every step reachable, hi excluded
    x0, group = torch.randn(6, 4, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    noised = ddpm.forward_noise(x0, group, 3, seeded())
    assert torch.equal(noised.t[:3], noised.t[3:]) and torch.equal(noised.noise[:3], noised.noise[3:])

    flow_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    flow = DenoisingScorer(flow_scheduler, timestep_sampling="range", timestep_range=(250.0, 750.0))
    timesteps, index, sigma = flow.sample_timesteps(4000, seeded())
    assert float(timesteps.min()) >= 250 and float(timesteps.max()) < 750
    assert torch.equal(sigma, flow_scheduler.sigmas[index]) and torch.allclose(timesteps, 1000 * sigma, atol=1e-3)
    allowed = ((flow_scheduler.timesteps >= 250) & (flow_scheduler.timesteps < 750)).sum()
    assert index.unique().numel() == allowed  # uniform over the table's steps in the range: all of them drawn
    with pytest.raises(TrlPlusError, match=r"training.timestep_range: \[1000.5, 2000.0\) holds none"):
        DenoisingScorer(flow_scheduler, timestep_sampling="range", timestep_range=(1000.5, 2000.0))


def test_flow_elbo_weights_equal_a_hand_computation():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from trl_plus.diffusion.scorer import DenoisingScorer

    scorer = DenoisingScorer(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), weighting="flow_elbo")
    index = torch.tensor([0, 250, 500, 999])
    s = (1000 - index.double()) / 1000  # the unshifted σ of table entry i, then SD3's shift 3
    sigma = 3 * s / (1 + 2 * s)
    expected = 0.5 * (1 - sigma) ** 2  # [0, 0.02, 0.0625, 0.4985]
    assert torch.allclose(scorer.weights(index).double(), expected, atol=1e-6, rtol=0)
    noised = scorer.forward_noise(torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 0, 1]), 2, seeded())
    assert torch.allclose(noised.weight.double(), 0.5 * (1 - noised.sigma.double()) ** 2, atol=1e-7, rtol=0)

    # Why: the ε implied by a velocity prediction, ε̂ = x_t + (1 − σ)·v̂, errs by exactly (1 − σ)·(v̂ − v).
    g = seeded(3)
    x0, eps, v_hat = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    sig = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).view(-1, 1, 1, 1)
    x_t = (1 - sig) * x0 + sig * eps
    e_velocity = ((v_hat - (eps - x0)) ** 2).mean((1, 2, 3))
    e_noise = ((x_t + (1 - sig) * v_hat - eps) ** 2).mean((1, 2, 3))
    assert torch.allclose(e_noise, (1 - sig.flatten()) ** 2 * e_velocity, atol=1e-12, rtol=0)

    with pytest.raises(TrlPlusError, match="training.weighting: flow_elbo weights the flow velocity error"):
        DenoisingScorer(DDPMScheduler(num_train_timesteps=1000), weighting="flow_elbo")


@pytest.mark.parametrize("options, expected", [
    ({"timestep_sampling": "range"}, "training.timestep_range: timestep_sampling: range draws t uniformly"),
    ({"timestep_sampling": "range", "timestep_range": [300, 100]}, "0 <= lo < hi"),
    ({"timestep_range": [0, 200]}, "training.timestep_range: used only with timestep_sampling: range"),
    ({"timestep_sampling": "banded"}, "training.timestep_sampling: 'banded' is not one of uniform, logit_normal"),
    ({"weighting": "elbo"}, "training.weighting: 'elbo' is not one of half, unit, snr, min_snr, flow_elbo"),
    ({"flip": "pair"}, "training.flip: 'pair' is not one of none, shared, independent"),
    ({"draws": 0}, "training.draws: the (t, ε) draws per example must be a positive integer, got 0"),
], ids=["range-without-bounds", "empty-bounds", "bounds-without-range", "sampling", "weighting", "flip", "draws"])  # fmt: skip
def test_scorer_options_are_one_line_errors(options, expected):
    from trl_plus.diffusion.scorer import check_scoring_options

    with pytest.raises(TrlPlusError) as info:
        check_scoring_options(options)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.fixture
def no_pipeline_loading(monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the recipe was checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)


def recipe(training=None, cache=None, name="tiny-sd"):
    model = {"kind": "diffusion", "name_or_path": name, "dtype": "float32"}
    if cache is not None:
        model["cache"] = cache
    return {"method": "diffusion-dpo", "model": model, "data": {"train": {"path": "recipes/data/diffusion_pairs.jsonl"}},
            "training": {"output_dir": "runs/x", "max_steps": 1, **(training or {})}}  # fmt: skip


@pytest.mark.parametrize("training, cache, expected", [
    ({"timestep_sampling": "range", "timestep_range": [200, 200]}, None,
     "recipe.yaml: training.timestep_range: timestep_sampling: range draws"),
    ({"draws": 0}, None, "recipe.yaml: training.draws: the (t, ε) draws per example must be a positive integer"),
    ({"flip": "pair"}, None, "recipe.yaml: training.flip: expected"),
    ({"weighting": "flow_elbo"}, None, "recipe.yaml: training.weighting: flow_elbo weights the flow velocity error"),
    ({}, {"latents": "sometimes"}, "model.cache.latents"),
    ({}, {"latents_budget": "lots"}, "model.cache.latents_budget: could not parse"),
    ({}, {"latents_budget": 0}, "model.cache.latents_budget"),
], ids=["range", "draws", "flip", "flow-elbo-on-ddpm", "latents", "budget-unit", "budget-zero"])  # fmt: skip
def test_recipe_fields_are_checked_before_any_model_loads(monkeypatch, no_pipeline_loading, training, cache, expected):
    from pathlib import Path

    from trl_plus import check_recipe

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(TrlPlusError) as info:
        loaded = load_recipe(recipe(training, cache))
        loaded._source = "recipe.yaml"
        check_recipe(loaded)
    assert expected in str(info.value) and "\n" not in str(info.value)
    if training.get("flip"):
        assert "'none', 'shared' or 'independent'" in str(info.value)  # the allowed values are named


def test_recipe_options_validate_and_train(monkeypatch, tmp_path):
    """A recipe setting every new field validates and trains on the tiny offline pipeline."""
    from pathlib import Path

    from trl_plus.run.train import build_trainer

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    training = {"timestep_sampling": "range", "timestep_range": [0, 500], "flip": "shared", "draws": 2,
                "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-4, "logging_steps": 1,
                "disable_tqdm": True, "save_strategy": "no", "output_dir": str(tmp_path / "run")}  # fmt: skip
    trainer = build_trainer(load_recipe(recipe(training, {"text": True, "latents": "auto", "latents_budget": "1MiB"})))
    assert trainer.latent_cache["mode"] == "memory" and trainer.args.draws == 2 and trainer.scorer.range_steps.numel() == 500
    trainer.train()
    logs = training_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and all(log["timestep/mean"] < 500 for log in logs)


# -- several draws per example ------------------------------------------------------------------------------------


def test_two_draws_are_the_mean_of_two_single_draw_losses_not_one_summed_sigmoid(tmp_path):
    import torch.nn.functional as F

    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path, training={"draws": 2})
    perturb(trainer.model, scale=0.002)  # policy ≠ the frozen reference
    batch = diffusion_batch(trainer, rows=3)
    size = 3
    assert batch["prompt_ids"].tolist() == batch["prompt_ids"][:size].tolist() * 2
    assert batch["group"].tolist() == list(range(2 * size)) * 2
    assert torch.equal(batch["x0"].view(2, 2, size, 4, 8, 8)[:, 0], batch["x0"].view(2, 2, size, 4, 8, 8)[:, 1])
    score = trainer.score(trainer.model, batch, seeded(1))
    grid = score.logps.view(2, 2 * size, 1)
    both = trainer.method.loss(LossContext(token_logps=grid, mask=torch.ones_like(grid),
                                           ref_token_logps=score.ref_logps.view(2, 2 * size, 1)))  # fmt: skip

    noised, cond = score.noised, trainer.conditioning(batch["prompt_ids"], batch["group"], torch.float32, "cpu")
    assert not torch.equal(noised.t[:size], noised.t[size:2 * size])  # the two draws are independent
    singles, margins = [], []
    for d in range(2):
        rows = torch.tensor([k * 2 * size + d * size + b for k in range(2) for b in range(size)])
        part = type(noised)(*(getattr(noised, f)[rows] if getattr(noised, f) is not None else None
                              for f in ("x_t", "timesteps", "target", "weight", "noise", "t", "sigma")))  # fmt: skip
        single = trainer.scorer.score_noised(trainer.model, part, {k: v[rows] for k, v in cond.items()},
                                             trainer.reference_errors)  # fmt: skip
        logps, ref = single.logps.view(2, size, 1), single.ref_logps.view(2, size, 1)
        singles.append(trainer.method.loss(LossContext(token_logps=logps, mask=torch.ones_like(logps),
                                                       ref_token_logps=ref)).loss)  # fmt: skip
        ratios = (logps - ref).sum(-1)
        margins.append(ratios[0] - ratios[1])
    assert both.loss.item() == pytest.approx(((singles[0] + singles[1]) / 2).item(), rel=1e-6)  # fp32
    summed = -F.logsigmoid(trainer.method.config.beta * (margins[0] + margins[1])).mean()
    assert abs(summed.item() - both.loss.item()) > 1e-2  # not D draws inside one sigmoid
    assert abs(singles[0].item() - singles[1].item()) > 1e-3


def test_training_with_two_draws_starts_at_log2_and_moves(tmp_path):
    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path, max_steps=3, learning_rate=1e-3,
                                     training={"draws": 2})  # fmt: skip
    trainer.train()
    losses = [log["loss"] for log in training_logs(trainer)]
    assert losses[0] == pytest.approx(LOG2, abs=1e-7) and losses[-1] != pytest.approx(LOG2, abs=1e-4)
    assert all(math.isfinite(loss) for loss in losses)


# -- flips ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_flips_are_seeded_shared_within_an_example_or_per_image(tmp_path, mode):
    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path, training={"flip": mode})
    batch = diffusion_batch(trainer)
    x0 = batch["x0"]
    trainer.model.train()
    first, again = trainer.clean_latents(batch, seeded(5)), trainer.clean_latents(batch, seeded(5))
    assert torch.equal(first, again)
    flipped = torch.tensor([torch.equal(row, ref.flip(-1)) for row, ref in zip(first, x0)])
    kept = torch.tensor([torch.equal(row, ref) for row, ref in zip(first, x0)])
    assert bool((flipped ^ kept).all()) and flipped.any() and kept.any()
    per_example = flipped.view(2, -1)
    if mode == "shared":
        assert torch.equal(per_example[0], per_example[1])
    else:
        assert not torch.equal(per_example[0], per_example[1])
    trainer.model.eval()  # evaluation: no flips (the official eval transform)
    assert torch.equal(trainer.clean_latents(batch, seeded(5)), x0)


# -- latents: cached under a budget, or encoded on the fly -----------------------------------------------------------


def image_rows(folder, n=3):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows, g = [], seeded(7)
    for i in range(n):
        paths = []
        for side in "ab":
            pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}{side}.png")
            paths.append(str(folder / f"{i}{side}.png"))
        rows.append({"prompt": f"picture {i}", "chosen": paths[0], "rejected": paths[1]})
    return rows


def vae_trainer(tmp_path, rows, **kwargs):
    from diffusers import DDPMScheduler

    from trl_plus.diffusion.models import DiffusionBundle
    from trl_plus.diffusion.tiny import _vae, tiny_unet
    from trl_plus.diffusion.trainer import DiffusionConfig, DiffusionTrainer

    torch.manual_seed(0)
    bundle = DiffusionBundle(tiny_unet(), DDPMScheduler(num_train_timesteps=1000), vae=_vae().eval())
    training = kwargs.pop("training", {})
    args = DiffusionConfig(str(tmp_path), report_to="none", use_cpu=True, seed=0, save_strategy="no", **training)
    return DiffusionTrainer(bundle, args, train_dataset=rows, encode_prompts=tiny_text_encoder(), **kwargs)


def test_the_latent_budget_switches_path_at_the_threshold_with_the_same_latents(tmp_path, caplog):
    rows = image_rows(tmp_path / "images")  # 6 images, 16x16 -> 4x8x8 latents: mean + std in fp32 = 2 KiB each
    per_image = 2 * 4 * 8 * 8 * 4
    trainers = {}
    with caplog.at_level(logging.INFO, logger="trl_plus.diffusion.trainer"):
        for name, budget in (("memory", 6 * per_image), ("on-the-fly", 6 * per_image - 1)):
            trainers[name] = vae_trainer(tmp_path / name, rows, latent_budget=budget)
    assert trainers["memory"].latent_cache["mode"] == "memory" and trainers["memory"].latent_cache["bytes"] == 6 * per_image
    assert trainers["on-the-fly"].latent_cache["mode"] == "on-the-fly"
    assert "6 images × 2.0 KiB = 12.0 KiB <= latents_budget 12.0 KiB: latents encoded once" in caplog.text
    assert "> latents_budget 12.0 KiB: images re-encoded by the VAE at every batch" in caplog.text
    assert set(trainers["on-the-fly"].train_dataset[0]["x0"]) == {"image_id"}
    assert vae_trainer(tmp_path / "t", rows, latent_cache=True, latent_budget=1).latent_cache["mode"] == "memory"
    assert vae_trainer(tmp_path / "f", rows, latent_cache=False).latent_cache["mode"] == "on-the-fly"

    latents = [trainer.clean_latents(diffusion_batch(trainer), seeded(2)) for trainer in trainers.values()]
    assert latents[0].shape == (6, 4, 8, 8)
    # one batched VAE encode against one per example: 0.0 apart on the CPU; a GPU kernel may differ by a few ulps
    assert torch.allclose(latents[0], latents[1], atol=1e-5, rtol=0)


def test_flips_use_the_encoding_of_the_flipped_image_cached_or_on_the_fly(tmp_path):
    rows = image_rows(tmp_path / "images")
    cached = vae_trainer(tmp_path / "c", rows, training={"flip": "shared"})
    live = vae_trainer(tmp_path / "l", rows, training={"flip": "shared"}, latent_cache=False)
    assert cached.latent_cache["bytes"] == 6 * 2 * (2 * 4 * 8 * 8 * 4)  # both encodings of every image
    x0 = cached.train_dataset[0]["x0"]
    relative = (x0["flip_mean"] - x0["mean"].flip(-1)).norm() / x0["flip_mean"].norm()
    assert relative > 0.1  # a flipped latent is not the encoding of the flipped image (the tiny VAE: 0.5–0.8)
    cached.model.train(), live.model.train()
    batch = diffusion_batch(cached)
    flips = draw_flips(batch["group"], 3, "shared", seeded(4))
    assert flips.any() and not flips.all()  # seed 4 flips some examples and keeps others
    got = [trainer.clean_latents(diffusion_batch(trainer), seeded(4)) for trainer in (cached, live)]
    assert torch.allclose(got[0], got[1], atol=1e-5, rtol=0)
    means = torch.where(flips.view(-1, 1, 1, 1), batch["x0_flip_mean"], batch["x0_mean"])
    stds = torch.where(flips.view(-1, 1, 1, 1), batch["x0_flip_std"], batch["x0_std"])
    g = seeded(4)
    torch.rand(3, generator=g)  # the flip draws come first
    assert torch.allclose(got[0], means + stds * torch.randn(means.shape, generator=g), atol=1e-6, rtol=0)
