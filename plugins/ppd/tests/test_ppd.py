"""PPD: the card's worked example and gradient signs; at init (W′_v = 0) the loss is log 2 and only the branch gets
gradients; a zeroed user embedding is the base exactly (diffusion-dpo of the base), and with a real one the loss is
the official Diffusion-DPO formula against an independent base UNet (reference = branch off); the branch is saved
alone and resumed; two users with opposite preferences learn opposite implicit margins; bad user embeddings are one
line naming the row, before any model loads; the recipe runs through trl_plus.train on tiny-sd."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trl_plus_ppd import PPD, add_user_branch, branch_processors

from trl_plus import LossContext, TrlPlusError, load_recipe
from trl_plus.testing import diffusion_batch, diffusion_loss, diffusion_rows, tiny_diffusion_trainer, training_logs

ROOT = Path(__file__).resolve().parents[3]
BETA = 5000.0
NO_DROPOUT = {"user_dropout": 0.0}


def user_rows(n=4, embeddings=([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]), seed=0):
    """``n`` random latent pairs, the i-th with user ``i % len(embeddings)``."""
    return [dict(row, user_embedding=list(embeddings[i % len(embeddings)]))
            for i, row in enumerate(diffusion_rows(n, seed=seed))]  # fmt: skip


def branch(trainer):
    return {n: p for n, p in trainer.model.named_parameters() if n in trainer.added_parameters}


def randomize_branch(trainer, seed=1, scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in branch(trainer).values():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def test_card_worked_example_and_gradient_signs():
    e = torch.tensor([[0.150, 0.220], [0.180, 0.210]], dtype=torch.float64).view(2, 2, 1).requires_grad_(True)
    ref = torch.tensor([[0.1502, 0.2199], [0.1799, 0.2102]], dtype=torch.float64).view(2, 2, 1)
    ctx = LossContext(token_logps=-0.5 * e, mask=torch.ones_like(e), ref_token_logps=-0.5 * ref, batch={})
    out = PPD(beta=BETA).loss(ctx)
    z = out.rewards[0] - out.rewards[1]
    assert z.tolist() == pytest.approx([0.75, -0.75], abs=1e-6)
    assert out.loss.item() == pytest.approx(0.761871, abs=1e-6)
    out.loss.backward()
    assert bool((e.grad[0] > 0).all()) and bool((e.grad[1] < 0).all())  # lower winner / higher loser error: lower loss


def test_init_loss_is_log2_and_only_the_branch_gets_gradients(tmp_path):
    trainer = tiny_diffusion_trainer("ppd", tmp_path, rows=user_rows(), batch_size=4, method_args=NO_DROPOUT)
    assert trainer.reference_mode == "adapter" and len(trainer.added_parameters) == 8  # 4 attn2 layers × (K′, V′)
    out = diffusion_loss(trainer, diffusion_batch(trainer), seed=0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    out.loss.backward()
    for name, p in trainer.model.named_parameters():
        if name in trainer.added_parameters:
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, name  # the frozen base
    grads = {n.rsplit(".", 3)[-3]: p.grad.abs().sum().item() for n, p in branch(trainer).items()}
    assert grads["to_v_ip"] > 0 and grads["to_k_ip"] == 0  # V′ = 0: K′ gets no gradient until V′ moves


def test_zeroed_user_embedding_is_diffusion_dpo_of_the_base(tmp_path):
    zero = tiny_diffusion_trainer("ppd", tmp_path / "z", rows=user_rows(embeddings=([0.0, 0.0, 0.0],)), batch_size=4,
                                  method_args=NO_DROPOUT)  # fmt: skip
    real = tiny_diffusion_trainer("ppd", tmp_path / "r", rows=user_rows(), batch_size=4, method_args=NO_DROPOUT)
    base = tiny_diffusion_trainer("diffusion-dpo", tmp_path / "d", rows=user_rows(), batch_size=4)
    for trainer in (zero, real):
        randomize_branch(trainer)  # W′_k, W′_v ≠ 0: the branch is on and trained-like
    seed = 3
    b_score = base.score(base.model, diffusion_batch(base), torch.Generator().manual_seed(seed))
    z_score = zero.score(zero.model, diffusion_batch(zero), torch.Generator().manual_seed(seed))
    assert torch.allclose(z_score.mse, b_score.mse, atol=1e-6) and torch.allclose(z_score.ref_mse, b_score.mse, atol=1e-6)
    z_loss = diffusion_loss(zero, diffusion_batch(zero), seed=seed).loss.item()
    assert z_loss == pytest.approx(diffusion_loss(base, diffusion_batch(base), seed=seed).loss.item(), abs=1e-6)
    # a real embedding: the policy moves off the base; the loss is the official formula against the base UNet
    r_score = real.score(real.model, diffusion_batch(real), torch.Generator().manual_seed(seed))
    assert not torch.allclose(r_score.mse, b_score.mse, atol=1e-4)
    assert torch.allclose(r_score.ref_mse, b_score.mse, atol=1e-6)  # reference = branch off = the base
    (pw, pl), (bw, bl) = r_score.mse.double().chunk(2), b_score.mse.double().chunk(2)
    official = -torch.nn.functional.logsigmoid(-0.5 * BETA * ((pw - pl) - (bw - bl))).mean()
    ours = diffusion_loss(real, diffusion_batch(real), seed=seed).loss.item()
    assert ours == pytest.approx(official.item(), abs=1e-5 * max(1.0, official.item()))
    assert abs(ours - math.log(2)) > 1e-3


def test_the_branch_is_saved_alone_and_resumed(tmp_path):
    training = {"save_strategy": "steps", "save_steps": 2}

    def run():
        return tiny_diffusion_trainer("ppd", tmp_path / "run", rows=user_rows(), max_steps=4, learning_rate=1e-3,
                                      training=training, method_args=NO_DROPOUT)  # fmt: skip

    whole = run()
    whole.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "method_weights.safetensors").is_file()
    assert not (checkpoint / "unet").exists() and not (checkpoint / "pytorch_lora_weights.safetensors").exists()
    resumed = run()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [log["loss"] for log in training_logs(resumed)][-2:] == [log["loss"] for log in training_logs(whole)][-2:]
    for name, p in branch(resumed).items():
        assert torch.equal(p, branch(whole)[name])
    # the saved branch on a fresh base reproduces the trained policy
    from trl_plus.testing import load_method_weights, tiny_unet

    whole.save_model(str(tmp_path / "final"))
    fresh = tiny_unet()
    names = add_user_branch(fresh, tokens=1, width=3)
    assert names == whole.added_parameters
    load_method_weights(fresh, names, tmp_path / "final")
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    users = {"image_embeds": [torch.tensor([[[[1.0, 0.0, 0.0]]], [[[0.0, 1.0, 0.0]]]])]}
    with torch.no_grad():
        expected = whole.model(x, torch.tensor([10, 900]), encoder_hidden_states=cond, added_cond_kwargs=users).sample
        got = fresh(x, torch.tensor([10, 900]), encoder_hidden_states=cond, added_cond_kwargs=users).sample
    assert torch.allclose(got, expected, atol=1e-6)


def test_two_users_with_opposite_preferences_learn_opposite_margins(tmp_path, one_thread):
    """User 1 prefers image A of each pair, user 2 image B (same prompts, same images): the base cannot tell them
    apart, the branch must. Implicit margins r(A) − r(B) on fixed draws: 0 at init, then > 0 for user 1, < 0 for 2."""
    pairs = diffusion_rows(4, seed=5)
    users = ([1.0, 0.0], [0.0, 1.0])
    rows = [dict(row, user_embedding=users[0]) for row in pairs]
    rows += [dict(row, user_embedding=users[1], x0=row["x0"].flip(0)) for row in pairs]  # user 2: B chosen
    evaluation = [dict(row, user_embedding=u) for u in users for row in pairs]  # A first for both users
    trainer = tiny_diffusion_trainer("ppd", tmp_path, rows=rows, batch_size=8, max_steps=30, learning_rate=3e-2,
                                     method_args={"beta": 500.0})  # fmt: skip

    def margins():
        batch = trainer._prepare_inputs(trainer.data_collator([
            {"prompt_id": trainer.prompt_id(r["prompt"]), "x0": r["x0"], "user_embedding": r["user_embedding"]}
            for r in evaluation]))  # fmt: skip
        trainer.model.eval()
        with torch.no_grad():
            total = torch.zeros(8)
            for seed in range(8):
                score = trainer.score(trainer.model, batch, torch.Generator().manual_seed(seed))
                reward = (score.logps - score.ref_logps).view(2, 8)
                total += (reward[0] - reward[1]) / 8
        trainer.model.train()
        return total[:4], total[4:]

    assert all(bool((m == 0).all()) for m in margins())
    trainer.train()
    first, second = margins()  # measured: means 7.8e-4 and −2.2e-4 (ℓ units), per pair user 1 − user 2 ≥ 1.8e-4
    assert first.mean() > 0 > second.mean() and bool((first > second).all()), (first, second)


@pytest.mark.parametrize("bad, expected", [
    ({"user_embedding": [1.0, 2.0]}, r"row 2: user_embedding has shape \[1, 2\] but row 1 has \[1, 3\]"),
    ({"user_embedding": "missing.npy"}, "row 2: user_embedding no such file"),
    ({"user_embedding": [1.0, float("nan"), 0.0]}, "row 2: user_embedding holds a NaN"),
    ({"user_embedding": "abc.txt"}, "row 2: user_embedding .*is not a .npy or .pt file"),
])  # fmt: skip
def test_bad_user_embeddings_name_the_row(tmp_path, bad, expected):
    from trl_plus.testing import checked_split

    rows = [json.loads(line) for line in open(ROOT / "recipes/data/diffusion_user_pairs.jsonl")][:3]
    for row in rows:
        for key in ("chosen", "rejected"):
            row[key] = str(ROOT / "recipes/data" / row[key])
        row["user_embedding"] = [0.0, 1.0, 0.5]
    rows[1].update(bad)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe({"method": "ppd", "model": {"kind": "diffusion", "name_or_path": "tiny-sd"},
                          "data": {"train": {"path": str(tmp_path / "d.jsonl")}}})  # fmt: skip
    with pytest.raises(TrlPlusError, match=expected) as info:
        checked_split(recipe)
    assert "\n" not in str(info.value)


def test_lora_and_other_reference_modes_are_refused_before_loading(tmp_path):
    from trl_plus.testing import checked_split

    data = str(ROOT / "recipes/data/diffusion_user_pairs.jsonl")
    for extra, expected in (({"model": {"kind": "diffusion", "name_or_path": "tiny-sd", "lora": {"r": 4}}},
                             "model.lora: ppd trains only its user branch"),
                            ({"reference": {"mode": "model"}}, "reference.mode: ppd's reference is the base")):
        recipe = load_recipe({"method": "ppd", "model": {"kind": "diffusion", "name_or_path": "tiny-sd"},
                              "data": {"train": {"path": data}}, **extra})  # fmt: skip
        with pytest.raises(TrlPlusError, match=expected):
            checked_split(recipe)


def test_embedding_files_and_the_recipe_through_train(tmp_path):
    import numpy as np

    from trl_plus import train

    rows = [json.loads(line) for line in open(ROOT / "recipes/data/diffusion_user_pairs.jsonl")][:4]
    for i, row in enumerate(rows):
        for key in ("chosen", "rejected"):
            row[key] = str(ROOT / "recipes/data" / row[key])
        np.save(tmp_path / f"user{i % 2}.npy", np.eye(2, 4, k=i % 2, dtype=np.float32))  # T = 2 tokens of D = 4
        row["user_embedding"] = f"user{i % 2}.npy"  # relative to the data file
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(ROOT / "recipes/ppd.yaml", [
        "model.name_or_path=tiny-sd", "model.resolution=16", f"data.train.path={tmp_path / 'd.jsonl'}",
        "data.train.columns={}", "data.train.label=null", "training.max_steps=2",
        "training.gradient_accumulation_steps=1", "training.per_device_train_batch_size=2",
        f"training.output_dir={tmp_path / 'run'}", "training.save_steps=100"])  # fmt: skip
    result = train(recipe)
    assert result.global_step == 2 and (tmp_path / "run" / "method_weights.safetensors").is_file()
    assert result.metrics["train_loss"] == pytest.approx(math.log(2), abs=0.05)


def test_branch_off_is_restored_after_the_reference(tmp_path):
    trainer = tiny_diffusion_trainer("ppd", tmp_path, rows=user_rows(), method_args=NO_DROPOUT)
    with trainer.reference_denoiser() as reference:
        assert all(p.scale == [0.0] for p in branch_processors(reference))
    assert all(p.scale == [1.0] for p in branch_processors(trainer.model))


def test_a_transformer_denoiser_is_refused_before_loading(tmp_path):
    """The branch lives in a UNet's cross-attention layers: an SD3 or Flux pipeline is one line, before any model
    loads (the pipeline folder's JSON files say which denoiser it has)."""
    from trl_plus import check_recipe

    data = str(ROOT / "recipes/data/diffusion_user_pairs.jsonl")
    recipe = load_recipe({"method": "ppd", "model": {"kind": "diffusion", "name_or_path": "tiny-sd3"},
                          "data": {"train": {"path": data}}})  # fmt: skip
    with pytest.raises(TrlPlusError, match=r"SD3Transformer2DModel \(sd3\); method 'ppd' drives unet denoisers only"):
        check_recipe(recipe)
