"""Flux in the diffusion trainer: ``denoise()`` equals FluxPipeline's own denoising step (packed 2x2 patches, ids,
σ timestep), the guidance embedding of guidance-distilled transformers, and the ``tiny-flux`` alias through the
recipe path: CLIP-pooled + T5 text cache, flow target, step-1 loss log 2 with the adapter-off reference, a LoRA
that ``FluxPipeline.load_lora_weights`` reads, and a run through ``trl_plus.train``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from test_diffusion import LOG2, recipe_dict, write_pairs  # noqa: E402

from trl_plus import load_recipe  # noqa: E402
from trl_plus.testing import training_logs  # noqa: E402

LORA = {"r": 4, "alpha": 4, "dropout": 0.0}


@pytest.fixture(scope="module")
def flux_pipeline():
    from diffusers import DiffusionPipeline

    from trl_plus.models.load import resolve_model_path

    return DiffusionPipeline.from_pretrained(resolve_model_path("tiny-flux"))


def test_denoise_is_the_flux_pipelines_own_step(flux_pipeline):
    """One Euler step of FluxPipeline from σ = 1 to 0 is x − v: the velocity it used equals denoise()'s."""
    from diffusers import FluxPipeline

    from trl_plus.diffusion.models import denoise

    pipe = flux_pipeline
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(x, 1, 4, 8, 8)
    with torch.no_grad():
        text, pooled, _ = pipe.encode_prompt(["a red square"], None, max_sequence_length=16)
        stepped = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, latents=packed.clone(), height=16, width=16,
                       num_inference_steps=1, output_type="latent").images  # fmt: skip
        ours = denoise(pipe.transformer, x, torch.tensor([1000.0]), {"text": text, "pooled": pooled})
    assert ours.shape == x.shape
    assert torch.allclose(FluxPipeline._pack_latents(ours, 1, 4, 8, 8), packed - stepped, atol=1e-5)


def test_the_guidance_embedding_of_a_guidance_distilled_flux():
    from trl_plus.diffusion.models import FLUX_TRAINING_GUIDANCE, denoise
    from trl_plus.diffusion.tiny import tiny_flux_transformer

    model = tiny_flux_transformer(guidance_embeds=True).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 800.0])
    cond = {"text": torch.randn(2, 5, 32), "pooled": torch.randn(2, 32)}
    with torch.no_grad():
        default = denoise(model, x, t, cond)
        same = denoise(model, x, t, {**cond, "guidance": torch.full((2,), FLUX_TRAINING_GUIDANCE)})
        other = denoise(model, x, t, {**cond, "guidance": 1.0})
    assert torch.equal(default, same) and not torch.allclose(default, other)


def test_tiny_flux_recipe_trains_a_lora_that_flux_pipeline_loads(tmp_path, flux_pipeline):
    from diffusers import DiffusionPipeline

    from trl_plus.models.load import resolve_model_path
    from trl_plus.run.train import build_trainer

    data = write_pairs(tmp_path / "data")
    trainer = build_trainer(load_recipe(recipe_dict(data, tmp_path / "run", name_or_path="tiny-flux", lora=LORA)))
    assert trainer.bundle.kind == "flux" and trainer.scorer.target == "flow" and trainer.reference_mode == "adapter"
    assert trainer.text_cache["text"].shape == (3, 16, 32) and trainer.text_cache["pooled"].shape == (3, 32)
    with torch.no_grad():  # the cache is FluxPipeline's own encoding: T5 tokens, CLIP pooled
        text, pooled, _ = flux_pipeline.encode_prompt(["picture 1"], None, max_sequence_length=16)
    row = trainer.prompt_id("picture 1")
    assert torch.allclose(trainer.text_cache["text"][row], text[0]) and torch.allclose(trainer.text_cache["pooled"][row],
                                                                                        pooled[0])  # fmt: skip
    assert trainer.bundle.pipeline.text_encoder is None and trainer.bundle.pipeline.text_encoder_2 is None  # freed
    trainer.train()
    assert training_logs(trainer)[0]["loss"] == pytest.approx(LOG2, abs=1e-7)
    trainer.save_model(str(tmp_path / "run"))
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    pipeline = DiffusionPipeline.from_pretrained(resolve_model_path("tiny-flux"))
    pipeline.load_lora_weights(str(tmp_path / "run"))
    loaded = dict(pipeline.transformer.named_parameters())
    names = [n for n in loaded if "lora_" in n]
    assert len(names) == len(trained)
    for name, parameter in trained.items():
        assert torch.equal(loaded[name.replace(".default.", ".default_0.")], parameter.detach())


def test_train_runs_a_tiny_flux_recipe(tmp_path):
    from trl_plus import train

    data = write_pairs(tmp_path / "data", size=(20, 24))
    result = train(recipe_dict(data, tmp_path / "run", name_or_path="tiny-flux", resolution=16, lora=LORA))
    assert result.global_step == 2 and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert {"mse/policy", "mse/reference", "rewards/accuracies"} <= set(result.metrics)
