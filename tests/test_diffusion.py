"""The diffusion core (issue 21): the denoising scorer under the unchanged DPO loss equals the official
Diffusion-DPO loss; t and ε are shared within a pair; LoRA (adapter-off reference) and the CPU NF4 path; a recipe
with the tiny offline pipeline trains, saves a LoRA that diffusers loads; bad input is one line before any model
loads."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from trl_plus import TrlPlusError, load_recipe  # noqa: E402
from trl_plus.testing import diffusion_rows, tiny_diffusion_trainer, training_logs  # noqa: E402

LOG2 = math.log(2)
BETA = 5000.0


def official_loss(trainer, batch, generator_seed=1):
    """(trl-plus loss, official Diffusion-DPO loss) on the same draws: the official formula
    (SalesforceAIResearch/DiffusionDPO train.py) recomputed from the model calls themselves."""
    import torch.nn.functional as F

    from trl_plus import LossContext

    model = trainer.model
    generator = torch.Generator().manual_seed(generator_seed)
    score = trainer.score(model, batch, generator)
    k, b = batch["num_sequences"], batch["prompt_ids"].size(0)
    ctx = LossContext(token_logps=score.logps.view(k, b, 1), mask=score.mask.view(k, b, 1),
                      ref_token_logps=score.ref_logps.view(k, b, 1), batch=batch)
    ours = trainer.method.loss(ctx).loss
    noised = score.noised
    cond = trainer.conditioning(batch["prompt_ids"], batch["group"], torch.float32, noised.x_t.device)

    def call(unet):
        return unet(noised.x_t, noised.timesteps, encoder_hidden_states=cond["text"]).sample

    model_losses = (call(model) - noised.target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    with torch.no_grad():
        if trainer.ref_model is not None:
            ref_pred = call(trainer.ref_model)
        else:
            model.disable_adapters()
            ref_pred = call(model)
            model.enable_adapters()
        ref_losses = (ref_pred - noised.target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    inside_term = -0.5 * BETA * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    return ours, -F.logsigmoid(inside_term).mean()


def first_batch(trainer):
    return trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:2]))


@pytest.mark.parametrize("target, lora, nf4", [("epsilon", False, False), ("v_prediction", False, False),
                                               ("flow", False, False), ("epsilon", True, False),
                                               ("epsilon", True, True)],
                         ids=["epsilon", "v", "flow", "lora-adapter-off", "nf4-lora"])  # fmt: skip
def test_step_one_loss_is_log2_when_policy_is_reference(tmp_path, target, lora, nf4):
    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path, target=target, lora=lora, nf4=nf4, max_steps=1)
    assert trainer.reference_mode == ("adapter" if lora else "model")
    trainer.train()
    (log,) = training_logs(trainer)
    assert log["loss"] == pytest.approx(LOG2, abs=1e-7)
    assert log["mse/policy"] == log["mse/reference"]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "timestep/mean"} <= set(log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Full fine-tuning (frozen-copy reference) and LoRA (adapter-off reference), 3 updates each."""
    out = {}
    for name, lora in (("full", False), ("lora", True)):
        trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path_factory.mktemp(name), lora=lora, max_steps=3,
                                         learning_rate=1e-3 if lora else 1e-4)  # fmt: skip
        trainer.train()
        out[name] = trainer
    return out


@pytest.mark.parametrize("name", ["full", "lora"])
def test_dpo_equals_the_official_diffusion_dpo_loss_after_updates(trained, name):
    trainer = trained[name]
    batch = first_batch(trainer)
    for seed in (1, 2, 3):
        ours, official = official_loss(trainer, batch, seed)
        assert abs(ours.item() - LOG2) > 1e-4  # the policy has left the reference
        assert abs(ours.item() - official.item()) <= 1e-7


def test_gradient_with_respect_to_the_winner_error_is_beta_over_4b(tmp_path):
    from trl_plus import LossContext

    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path)
    for size in (2, 4):
        batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:size]))
        score = trainer.score(trainer.model, batch, torch.Generator().manual_seed(0))
        mse = score.mse.detach().requires_grad_(True)
        logps = -(score.noised.weight * mse).view(2, size, 1)
        ctx = LossContext(token_logps=logps, mask=torch.ones_like(logps), ref_token_logps=score.ref_logps.view(2, size, 1))
        trainer.method.loss(ctx).loss.backward()
        assert torch.equal(mse.grad[:size], torch.full((size,), BETA / (4 * size)))
        assert torch.equal(mse.grad[size:], torch.full((size,), -BETA / (4 * size)))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "independent"])
def test_winner_equal_to_loser_stays_log2_only_when_t_and_noise_are_shared(tmp_path, shared):
    training = {} if shared else {"share_timestep": False, "share_noise": False}
    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path, rows=diffusion_rows(same=True), max_steps=4,
                                     learning_rate=1e-3, training=training)  # fmt: skip
    trainer.train()
    losses = [log["loss"] for log in training_logs(trainer)]
    assert losses[0] == pytest.approx(LOG2, abs=1e-7)  # step 1: policy = reference, whatever the draws
    if shared:
        assert all(loss == pytest.approx(LOG2, abs=1e-7) for loss in losses)
    else:
        assert max(abs(loss - LOG2) for loss in losses[1:]) > 1e-3


def test_timestep_sampling_and_weights():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_snr

    from trl_plus.diffusion.scorer import DenoisingScorer

    ddpm = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    x0 = torch.randn(6, 4, 8, 8)
    group = torch.tensor([0, 1, 2, 0, 1, 2])
    for sampling in ("uniform", "logit_normal", "mode", "stratified"):
        noised = DenoisingScorer(ddpm, timestep_sampling=sampling).forward_noise(x0, group, 3, torch.Generator().manual_seed(0))
        assert torch.equal(noised.t[:3], noised.t[3:]) and torch.equal(noised.noise[:3], noised.noise[3:])
        assert int(noised.t.min()) >= 0 and int(noised.t.max()) < 1000
    scorer = DenoisingScorer(ddpm, weighting="min_snr", snr_gamma=5.0)
    t = torch.tensor([10, 500, 990])
    snr = compute_snr(ddpm, t)
    assert torch.allclose(scorer.weights(t), 0.5 * torch.minimum(snr, torch.tensor(5.0)) / snr)
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    noised = DenoisingScorer(flow).forward_noise(x0, group, 3, torch.Generator().manual_seed(0))
    s = noised.sigma.view(-1, 1, 1, 1)
    assert torch.allclose(noised.x_t, (1 - s) * x0 + s * noised.noise) and torch.equal(noised.target, noised.noise - x0)
    assert torch.allclose(noised.timesteps, noised.sigma * 1000, atol=1e-3)
    with pytest.raises(TrlPlusError, match="flow-matching"):
        DenoisingScorer(flow, weighting="snr")


def test_caption_dropout_is_shared_by_the_pair(tmp_path):
    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path, training={"caption_dropout": 0.5})
    batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:8]))
    seen = []
    trainer.conditioning = lambda ids, group, dtype, device: seen.append(ids.clone()) or type(trainer).conditioning(
        trainer, ids, group, dtype, device)
    trainer.model.train()
    trainer.score(trainer.model, batch, torch.Generator().manual_seed(0))
    (ids,) = seen
    assert (ids == 0).any() and (ids != 0).any()  # some examples dropped their prompt (row 0: the empty prompt)


# -- the recipe path: tiny-sd, image files, LoRA on a 4-bit denoiser -------------------------------------------


def write_pairs(folder, n=4, size=(16, 16), bad=None):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for side, value in (("a", 200), ("b", 40)):
            Image.new("RGB", size, (value, 255 - value, (37 * i) % 255)).save(folder / f"{i}{side}.png")
        rows.append({"prompt": f"picture {i % 2}", "chosen": f"{i}a.png", "rejected": f"{i}b.png", "label_0": 1})
    if bad is not None:
        rows[-1].update(bad)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "pairs.jsonl")


def recipe_dict(data, out, **model):
    return {
        "method": "diffusion-dpo",
        "model": {"kind": "diffusion", "name_or_path": "tiny-sd", "dtype": "float32", **model},
        "data": {"train": {"path": data, "label": "label_0"}},
        "training": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                     "logging_steps": 1, "disable_tqdm": True, "save_strategy": "no"},
    }


def test_a_recipe_trains_a_4bit_lora_that_diffusers_loads(tmp_path):
    import bitsandbytes as bnb
    from diffusers import DiffusionPipeline

    from trl_plus.models.load import resolve_model_path
    from trl_plus.run.train import build_trainer

    data = write_pairs(tmp_path / "data")
    recipe = load_recipe(recipe_dict(data, tmp_path / "run", lora={"r": 4, "alpha": 4, "dropout": 0.0},
                                     quantization={"load_in_4bit": True, "compute_dtype": "float32"}))  # fmt: skip
    trainer = build_trainer(recipe)
    unet = trainer.model
    assert trainer.bundle.quantization == "cpu-nf4-swap" and trainer.reference_mode == "adapter"
    base = [m.base_layer for n, m in unet.named_modules() if hasattr(m, "base_layer") and "transformer_blocks" in n]
    assert base and all(isinstance(m, bnb.nn.Linear4bit) and m.weight.dtype == torch.uint8 for m in base)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainer.train()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable  # only LoRA parameters moved
    logs = training_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(LOG2, abs=1e-7)
    trainer.save_model(str(tmp_path / "run"))
    pipeline = DiffusionPipeline.from_pretrained(resolve_model_path("tiny-sd"))
    pipeline.load_lora_weights(str(tmp_path / "run"))
    loaded = [n for n, _ in pipeline.unet.named_parameters() if "lora_" in n]
    assert len(loaded) == len(trainable)


def test_train_runs_a_diffusion_recipe_end_to_end(tmp_path):
    from trl_plus import train

    data = write_pairs(tmp_path / "data", size=(20, 24))
    result = train(recipe_dict(data, tmp_path / "run", resolution=16, lora={"r": 4, "alpha": 4, "dropout": 0.0}))
    assert result.global_step == 2 and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert {"mse/policy", "mse/reference", "rewards/accuracies"} <= set(result.metrics)


def test_train_prints_the_held_out_table_and_eval_repeats_it(tmp_path):
    """A diffusion recipe with data.eval ends with the before/after table (implicit-reward accuracy exactly 0.5
    before: the same seeded draws for policy and reference), and ``trl-plus eval`` of the run gives the same after
    figures from the saved LoRA."""
    from trl_plus import train
    from trl_plus.run.evaluate import evaluate

    data = write_pairs(tmp_path / "data")
    recipe = recipe_dict(data, tmp_path / "run", lora={"r": 4, "alpha": 4, "dropout": 0.0})
    recipe["data"]["eval"] = {"path": data, "label": "label_0"}
    recipe["training"].update(max_steps=3, learning_rate=3e-2, eval_strategy="no")
    result = train(recipe)
    report = result.evaluation
    assert report.before["reward_accuracy"] == 0.5 and report.before["reward_margin"] == 0.0
    assert report.after["reward_margin"] != 0.0 and "normalized_likelihood_accuracy" not in report.after
    table = report.table()
    assert "images: log-prob = ℓ = −w·ē" in table and "tokens" not in table
    again = evaluate(tmp_path / "run")
    for key in ("reward_accuracy", "reward_margin", "logps/chosen", "logps/rejected"):
        assert again.before[key] == pytest.approx(report.before[key], abs=1e-6)
        assert again.after[key] == pytest.approx(report.after[key], rel=1e-5, abs=1e-7)
    from trl_plus.run.compare import compare_runs

    recipe["method_args"] = {"beta": 2500}
    recipe["training"]["output_dir"] = str(tmp_path / "run-2500")
    train(recipe)
    comparison = compare_runs([str(tmp_path / "run"), str(tmp_path / "run-2500")])
    assert list(comparison.reports) == ["diffusion-dpo β=5000", "diffusion-dpo β=2500"]
    assert comparison.reports["diffusion-dpo β=5000"].after["reward_margin"] == pytest.approx(report.after["reward_margin"],
                                                                                       rel=1e-5)  # fmt: skip
    assert "images: log-prob" in comparison.table()


def test_sd3_pipeline_alias_scores_with_the_flow_target(tmp_path):
    from trl_plus.run.train import build_trainer

    data = write_pairs(tmp_path / "data")
    trainer = build_trainer(load_recipe(recipe_dict(data, tmp_path / "run", name_or_path="tiny-sd3")))
    assert trainer.scorer.target == "flow" and trainer.bundle.kind == "sd3"
    assert trainer.text_cache["pooled"].shape == (3, 64)
    assert trainer.bundle.pipeline.text_encoder is None and trainer.bundle.pipeline.text_encoder_2 is None  # freed
    trainer.train()
    assert training_logs(trainer)[0]["loss"] == pytest.approx(LOG2, abs=1e-7)


# -- bad input: one line, before any model loads ----------------------------------------------------------------


@pytest.fixture
def no_pipeline_loading(monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the recipe and data were checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)


def _error(recipe) -> str:
    from trl_plus.run.train import build_trainer

    with pytest.raises(TrlPlusError) as info:
        build_trainer(load_recipe(recipe))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_text_method_on_a_diffusion_recipe_and_vice_versa(tmp_path, no_pipeline_loading):
    data = write_pairs(tmp_path / "data")
    assert "trains language models" in _error({**recipe_dict(data, tmp_path / "r"), "method": "dpo"})
    text = {"method": "diffusion-dpo", "model": {"name_or_path": "tiny-llama"},
            "data": {"train": {"path": "recipes/data/quickstart_prefs.jsonl"}}}  # fmt: skip
    assert "set model.kind: diffusion" in _error(text)
    with pytest.raises(TrlPlusError, match="keys of a diffusion pipeline"):
        load_recipe({**text, "model": {"name_or_path": "tiny-llama", "resolution": 64}})


def test_an_unknown_denoiser_class_is_named(tmp_path, no_pipeline_loading):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet3DConditionModel"]}))
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    data = write_pairs(tmp_path / "data")
    assert "denoiser class UNet3DConditionModel is not supported" in _error(
        recipe_dict(data, tmp_path / "r", name_or_path=str(folder)))


@pytest.mark.parametrize("bad, expected", [
    ({"rejected": "missing.png"}, "row 4 (line 4 of"),
    ({"chosen": "pairs.jsonl"}, "is not an image"),
    ({"label_0": 0.3}, "label_0 is 0.3"),
], ids=["missing", "not-an-image", "bad-label"])  # fmt: skip
def test_bad_image_rows_name_file_and_row(tmp_path, no_pipeline_loading, bad, expected):
    data = write_pairs(tmp_path / "data", bad=bad)
    message = _error(recipe_dict(data, tmp_path / "r"))
    assert expected in message and "pairs.jsonl" in message


def test_images_of_different_sizes_need_a_resolution(tmp_path, no_pipeline_loading):
    from PIL import Image

    data = write_pairs(tmp_path / "data")
    Image.new("RGB", (32, 16)).save(tmp_path / "data" / "2b.png")
    assert "need model.resolution" in _error(recipe_dict(data, tmp_path / "r"))


def test_labels_swap_pairs_and_drop_ties(tmp_path):
    from trl_plus.run.validate import check_recipe, load_split

    data = write_pairs(tmp_path / "data")
    rows = [json.loads(line) for line in open(data)]
    rows[0]["label_0"], rows[1]["label_0"] = 0, 0.5
    open(data, "w").write("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(recipe_dict(data, tmp_path / "r"))
    method, _ = check_recipe(recipe)
    split = load_split(recipe, method, "train").to_list()
    assert len(split) == 3 and split[0]["chosen"].endswith("0b.png") and split[0]["rejected"].endswith("0a.png")
    recipe = load_recipe({**recipe_dict(data, tmp_path / "r"), "data": {"train": {"path": data, "label": "label_0"},
                                                                        "ties": "keep_as_soft"}})  # fmt: skip
    assert [r["label"] for r in load_split(recipe, method, "train").to_list()] == [1.0, 0.5, 1.0, 1.0]


def test_a_scheduler_target_the_method_cannot_train(tmp_path, no_pipeline_loading):
    from trl_plus import DPO, Paper
    from trl_plus.diffusion.method import DiffusionMethod, Scoring
    from trl_plus.testing import registered

    class EpsilonOnly(DiffusionMethod, DPO):
        name = "epsilon-only"
        paper = Paper("test", "0000.00000")
        scoring = Scoring(targets=("epsilon",))

    data = write_pairs(tmp_path / "data")
    with registered(EpsilonOnly):
        message = _error({**recipe_dict(data, tmp_path / "r", name_or_path="tiny-sd3"), "method": "epsilon-only"})
    assert "predicts flow, which method 'epsilon-only' cannot train" in message


def test_list_names_the_extra_when_diffusers_is_missing(monkeypatch, capsys):
    import importlib.util

    from trl_plus.testing import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert cli("list", "--wide") == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("diffusion-dpo "))
    assert 'pip install "trl-plus[diffusion]"' in out and "trl-plus[diffusion]" in line


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run(tmp_path, lora):
    training = {"save_strategy": "steps", "save_steps": 2}
    whole = tiny_diffusion_trainer("diffusion-dpo", tmp_path / "whole", lora=lora, max_steps=4, learning_rate=1e-3,
                                   training=training)  # fmt: skip
    whole.train()
    assert (tmp_path / "whole" / "checkpoint-2" / ("pytorch_lora_weights.safetensors" if lora else "unet")).exists()
    resumed = tiny_diffusion_trainer("diffusion-dpo", tmp_path / "whole", lora=lora, max_steps=4, learning_rate=1e-3,
                                     training=training)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert [log["loss"] for log in training_logs(resumed)][-2:] == [log["loss"] for log in training_logs(whole)][-2:]


def test_evaluation_draws_are_seeded(tmp_path):
    rows = diffusion_rows(4, seed=1)
    trainer = tiny_diffusion_trainer("diffusion-dpo", tmp_path, eval_dataset=rows, max_steps=1)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"] == pytest.approx(LOG2, abs=1e-7)
    assert first["eval_mse/policy"] == second["eval_mse/policy"] and "eval_timestep/mean" in first


def test_ties_kept_as_soft_labels_are_smoothed():
    from trl_plus import DiffusionDPO
    from trl_plus.testing import make_context

    ctx = make_context([[[-0.50], [-0.40]], [[-0.52], [-0.41]]], [[[-0.51], [-0.40]], [[-0.51], [-0.40]]],
                       batch={"label": torch.tensor([1.0, 0.5], dtype=torch.float64)})  # fmt: skip
    losses, ratios = DiffusionDPO().pair_losses(ctx)
    x = 5000 * (ratios[0] - ratios[1])
    import torch.nn.functional as F

    assert losses[0].item() == pytest.approx(-F.logsigmoid(x[0]).item())
    assert losses[1].item() == pytest.approx(-(0.5 * F.logsigmoid(x[1]) + 0.5 * F.logsigmoid(-x[1])).item())


def test_validate_a_diffusion_recipe(monkeypatch, capsys):
    from pathlib import Path

    from trl_plus.testing import cli

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cli("validate", "recipes/diffusion-sft.yaml") == 0
    captured = capsys.readouterr()
    assert "ok (method diffusion-sft" in captured.out and "token lengths" not in captured.err
