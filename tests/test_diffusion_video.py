"""Video denoisers and per-segment scores (issue 21): the ``tiny-wan`` pipeline alias (WanTransformer3DModel, Wan
VAE, UMT5) trains from a recipe of ready-latent files with the flow target and saves a LoRA that WanPipeline loads;
Wan's flow-prediction sampler becomes a flow-matching training scheduler; per-segment element means (the default
path keeps one score per image); latent files are checked before any model loads."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trl_plus import TrlPlusError, load_recipe  # noqa: E402
from trl_plus.testing import training_logs  # noqa: E402


def write_latent_pairs(folder, n=3, shape=(4, 4, 8, 8), suffix=".pt"):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        row = {"prompt": f"clip {i}"}
        for key in ("chosen", "rejected"):
            latent, name = torch.randn(*shape, generator=generator), f"{i}{key[0]}{suffix}"
            if suffix == ".pt":
                torch.save(latent, folder / name)
            else:
                save_file({"latents": latent}, str(folder / name))
            row[key] = name
        rows.append(row)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "pairs.jsonl")


def video_recipe(data, out, **model):
    return {"method": "diffusion-dpo", "method_args": {"beta": 500},
            "model": {"kind": "diffusion", "name_or_path": "tiny-wan", "dtype": "float32", **model},
            "data": {"train": {"path": data}},
            "training": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                         "logging_steps": 1, "disable_tqdm": True, "save_strategy": "no",
                         "timestep_sampling": "logit_normal"}}  # fmt: skip


def test_tiny_wan_trains_from_latent_files_and_its_lora_loads_into_wan_pipeline(tmp_path):
    from diffusers import WanPipeline

    from trl_plus.models.load import resolve_model_path
    from trl_plus.run.train import build_trainer

    data = write_latent_pairs(tmp_path / "data", suffix=".safetensors")
    trainer = build_trainer(load_recipe(video_recipe(data, tmp_path / "run", lora={"r": 4, "alpha": 4, "dropout": 0.0})))
    assert trainer.bundle.kind == "wan" and trainer.scorer.target == "flow" and trainer.reference_mode == "adapter"
    assert trainer.text_cache["text"].shape == (4, 16, 32) and trainer.bundle.pipeline.text_encoder is None
    assert trainer.train_dataset[0]["x0"].shape == (2, 4, 4, 8, 8)  # the files, as they are: no VAE
    trainer.train()
    assert training_logs(trainer)[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    trainer.save_model(str(tmp_path / "run"))
    pipeline = WanPipeline.from_pretrained(resolve_model_path("tiny-wan"))
    pipeline.load_lora_weights(str(tmp_path / "run"))
    assert any("lora_" in n for n, _ in pipeline.transformer.named_parameters())


def test_wan_denoise_is_the_pipelines_transformer_call():
    from trl_plus.diffusion.models import denoise
    from trl_plus.diffusion.tiny import tiny_wan_transformer

    model = tiny_wan_transformer()
    x, t, text = torch.randn(2, 4, 3, 8, 8), torch.tensor([250.0, 750.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        ours = denoise(model, x, t, {"text": text})
        theirs = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]  # WanPipeline's
    assert ours.shape == x.shape and torch.equal(ours, theirs)


def test_a_flow_prediction_sampler_trains_on_flow_matching_tables(tmp_path):
    from diffusers import UniPCMultistepScheduler

    from trl_plus.diffusion.models import pipeline_facts, training_scheduler
    from trl_plus.models.load import resolve_model_path

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler = training_scheduler(unipc)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and scheduler.config.shift == 3.0
    assert torch.allclose(scheduler.timesteps, 1000 * scheduler.sigmas[: len(scheduler.timesteps)])  # 1000·σ
    import shutil

    folder = tmp_path / "wan"
    shutil.copytree(resolve_model_path("tiny-wan"), folder)
    unipc.save_config(str(folder / "scheduler"))
    assert pipeline_facts(folder).prediction_type == "flow"


def test_segment_means_and_the_default_path():
    from trl_plus.diffusion.data import segment_ids
    from trl_plus.diffusion.scorer import segment_means

    assert segment_ids(5, segment_frames=2) == [0, 0, 1, 1, 2] and segment_ids(5, [1, 4]) == [0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="add up to 4 latent frames, but the latents have 5"):
        segment_ids(5, [1, 3])
    squared = torch.rand(2, 3, 5, 2, 2, dtype=torch.float64)
    means, mask = segment_means(squared, torch.tensor([[0, 0, 1, 1, 1], [0, -1, -1, 2, 2]]))
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert torch.allclose(means[0], torch.stack([squared[0, :, :2].mean(), squared[0, :, 2:].mean(), zero]))
    assert torch.allclose(means[1, [0, 2]], torch.stack([squared[1, :, :1].mean(), squared[1, :, 3:].mean()]))
    assert mask.tolist() == [[True, True, False], [True, False, True]]
    with pytest.raises(TrlPlusError, match="F = 4 latent frames"):
        segment_means(squared, torch.zeros(2, 4, dtype=torch.long))


def test_one_score_per_image_without_segments(tmp_path):
    from trl_plus.testing import diffusion_batch, tiny_diffusion_trainer

    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path, target="video")
    score = trainer.score(trainer.model, diffusion_batch(trainer), torch.Generator().manual_seed(0))
    assert score.mse.shape == (16,) and score.logps.shape == (16, 1) and score.noised.segments is None


@pytest.mark.parametrize("bad, expected", [
    (lambda f: torch.save(torch.randn(4, 8), f / "1c.pt"), "holds a tensor of shape (4, 8)"),
    (lambda f: torch.save(torch.randn(4, 5, 8, 8), f / "1c.pt"), "has shape [4, 5, 8, 8] but"),
    (lambda f: torch.save({"x": 1}, f / "1c.pt"), "holds dict, not one float tensor"),
    (lambda f: (f / "1c.pt").write_text("not a tensor"), "cannot be read (UnpicklingError)"),
], ids=["rank", "shape", "not-a-tensor", "unreadable"])  # fmt: skip
def test_bad_latent_files_are_one_line_before_any_model_loads(tmp_path, monkeypatch, bad, expected):
    import diffusers

    from trl_plus.run.train import build_trainer

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    data = write_latent_pairs(tmp_path / "data")
    bad(tmp_path / "data")
    with pytest.raises(TrlPlusError) as info:
        build_trainer(load_recipe(video_recipe(data, tmp_path / "run")))
    message = str(info.value)
    assert expected in message and "row 2" in message and "pairs.jsonl" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["wan", "flux"])
def test_the_cpu_nf4_swap_reaches_every_transformer_block(kind):
    """4-bit on a CPU quantizes the blocks' linears of Wan (``blocks.N``) and Flux (double- and single-stream) too,
    not only the ``transformer_blocks`` of UNets and SD3."""
    import bitsandbytes as bnb

    from trl_plus.diffusion.models import quantize_nf4
    from trl_plus.diffusion.tiny import tiny_flux_transformer, tiny_wan_transformer

    model = tiny_wan_transformer() if kind == "wan" else tiny_flux_transformer()
    blocks = "blocks." if kind == "wan" else "transformer_blocks"
    expected = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                and (n.startswith(blocks) if kind == "wan" else blocks in n)]  # fmt: skip
    assert expected and quantize_nf4(model) == len(expected)
    swapped = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert swapped == set(expected)
    if kind == "flux":
        assert any(n.startswith("single_transformer_blocks") for n in swapped)
