"""DenseDPO: the card's worked example (dense and whole-video labels) and gradient signs, all-tie labels, the
label-flip/video-swap symmetry, log 2 at init on the tiny Wan transformer, the reduction to diffusion-dpo (one
segment: same β; two equal segments labelled +1: twice β), per-segment errors against a hand computation, a few
training steps that grow the dense margin, and the latent-file rows through the recipe checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trl_plus_densedpo import DenseDPO

from trl_plus import TrlPlusError
from trl_plus.testing import (
    diffusion_batch,
    diffusion_loss,
    diffusion_rows,
    make_context,
    perturb,
    tiny_diffusion_trainer,
    training_logs,
)

ROOT = Path(__file__).resolve().parents[3]
LOG2 = math.log(2)
S0, S1 = [-0.002, 0.001, 0.0005], [0.001, -0.001, 0.0005]  # the card's s_f(x⁰), s_f(x¹)


def card_context(labels, s0=S0, s1=S1):
    """One pair, ℓ_ref = 0 and ℓ_θ = −s (so s_f = ℓ_ref − ℓ_θ), labels ``[1, S]``."""
    return make_context([[[-v for v in s0]], [[-v for v in s1]]], [[[0.0] * len(s0)], [[0.0] * len(s1)]],
                        batch={"labels": torch.tensor([labels], dtype=torch.float64)})  # fmt: skip


def test_card_worked_example_and_gradient_signs():
    ctx = card_context([1, -1, 0])
    out = DenseDPO().loss(ctx)
    assert out.loss.item() == pytest.approx(0.0788897, abs=1e-6)
    assert out.metrics["densedpo/margin"].item() == pytest.approx(0.005, abs=1e-12)  # z = β·0.005 = 2.5
    out.loss.backward()
    grad = ctx.token_logps.grad[:, 0]  # ∂L/∂ℓ_θ: −β·l_f·σ(−z) on video 0, the opposite on video 1
    factor = 500 * torch.sigmoid(torch.tensor(-2.5, dtype=torch.float64)).item()
    assert grad[0].tolist() == pytest.approx([-factor, factor, 0.0], abs=1e-9)
    assert grad[1].tolist() == pytest.approx([factor, -factor, 0.0], abs=1e-9)
    assert DenseDPO().loss(card_context([1, 1, 1])).loss.item() == pytest.approx(0.474077, abs=1e-6)  # whole video


def test_all_tie_labels_give_log2_and_no_gradient():
    ctx = card_context([0, 0, 0])
    loss = DenseDPO().loss(ctx).loss
    assert loss.item() == pytest.approx(LOG2, abs=1e-12)
    loss.backward()
    assert torch.equal(ctx.token_logps.grad, torch.zeros_like(ctx.token_logps))


def test_flipping_every_label_and_swapping_the_videos_changes_nothing():
    labels = [1, -1, 0]
    swapped = card_context([-v for v in labels], s0=S1, s1=S0)
    assert DenseDPO().loss(swapped).loss.item() == pytest.approx(DenseDPO().loss(card_context(labels)).loss.item(),
                                                                 abs=1e-12)


def video_rows(labels, n=4, segments=None, seed=0):
    """``n`` pairs of 4x4x8x8 video latents (4 latent frames) with the same labels (and explicit segment ids)."""
    rows = diffusion_rows(n, shape=(4, 4, 8, 8), seed=seed)
    for row in rows:
        row["labels"] = list(labels)
        if segments is not None:
            row["segment_ids"] = list(segments)
    return rows


@pytest.mark.parametrize("segment_frames, labels, dpo_beta", [(4, [1], 500.0), (2, [1, 1], 1000.0)],
                         ids=["one-segment", "two-equal-segments"])  # fmt: skip
def test_reduces_to_diffusion_dpo(tmp_path, segment_frames, labels, dpo_beta):
    """One segment with label +1 is diffusion-dpo (= flow-dpo) at the same β; S equal segments all +1 sum S
    segment means, i.e. S times the whole-video mean: diffusion-dpo at S·β (the reduction, pinned). In float64: in
    fp32 the two reductions (segment means, then their sum; one mean) round apart by ~1e-4 in the loss at β 500."""
    rows = [dict(row, x0=row["x0"].double()) for row in video_rows(labels)]
    training = {"timestep_sampling": "logit_normal"}
    dense = tiny_diffusion_trainer("densedpo", tmp_path / "dense", target="video", rows=rows, batch_size=4,
                                   method_args={"segment_frames": segment_frames}, training=training)  # fmt: skip
    dpo = tiny_diffusion_trainer("diffusion-dpo", tmp_path / "dpo", target="video", rows=rows, batch_size=4,
                                 method_args={"beta": dpo_beta}, training=training)  # fmt: skip
    for trainer in (dense, dpo):
        trainer.model.double(), trainer.ref_model.double()
        perturb(trainer.model, seed=1, scale=0.02)
    ours = diffusion_loss(dense, diffusion_batch(dense), seed=3).loss.item()
    theirs = diffusion_loss(dpo, diffusion_batch(dpo), seed=3).loss.item()
    assert ours == pytest.approx(theirs, abs=1e-6) and abs(ours - LOG2) > 1e-3


def test_per_segment_errors_are_the_element_means_over_each_segments_frames(tmp_path):
    from trl_plus import denoise

    segments = [0, 1, 1, 1]  # unequal segments: 1 and 3 latent frames
    trainer = tiny_diffusion_trainer("densedpo", tmp_path, target="video", rows=video_rows([1, -1], segments=segments))
    perturb(trainer.model, seed=2, scale=0.02)
    batch = diffusion_batch(trainer)
    score = trainer.score(trainer.model, batch, torch.Generator().manual_seed(0))
    noised = score.noised
    cond = trainer.conditioning(batch["prompt_ids"], batch["group"], torch.float32, noised.x_t.device)
    with torch.no_grad():
        squared = (denoise(trainer.model, noised.x_t, noised.timesteps, cond) - noised.target) ** 2  # [N, C, F, h, w]
        ref = (denoise(trainer.ref_model, noised.x_t, noised.timesteps, cond) - noised.target) ** 2
    for errors, by_hand in ((score.mse, squared), (score.ref_mse, ref)):
        expected = torch.stack([by_hand[:, :, :1].mean((1, 2, 3, 4)), by_hand[:, :, 1:].mean((1, 2, 3, 4))], 1)
        assert errors.shape == (8, 2) and torch.allclose(errors.detach(), expected, rtol=1e-6, atol=0)
    assert torch.equal(score.logps, -0.5 * score.mse) and torch.equal(score.mask, torch.ones(8, 2))
    assert not torch.allclose(score.mse, score.ref_mse)


def test_log2_at_init_and_training_grows_the_dense_margin(tmp_path):
    rows = video_rows([1, -1])
    for i, row in enumerate(rows):  # video 0 is better on the first segment only, video 1 on the second
        row["x0"][0, :, 2:] = row["x0"][1, :, 2:] + 0.1 * i
    trainer = tiny_diffusion_trainer("densedpo", tmp_path, target="video", rows=rows, batch_size=4, max_steps=8,
                                     learning_rate=3e-3, method_args={"segment_frames": 2},
                                     training={"timestep_sampling": "logit_normal"})  # fmt: skip
    batch = diffusion_batch(trainer)

    def held_margin():
        return sum(diffusion_loss(trainer, batch, seed=s).metrics["densedpo/margin"].item() for s in range(4)) / 4

    assert trainer.bundle.kind == "wan" and trainer.scorer.target == "flow"
    assert held_margin() == 0.0
    trainer.train()
    logs = training_logs(trainer)
    assert logs[0]["loss"] == pytest.approx(LOG2, abs=1e-7)  # step 1: policy = reference
    assert logs[0]["mse/policy"] == logs[0]["mse/reference"] and logs[-1]["loss"] < LOG2
    assert held_margin() > 0


# -- rows of latent files, checked before any model loads -------------------------------------------------------


def write_rows(folder, edit=None):
    rows = [json.loads(line) for line in (ROOT / "recipes" / "data" / "densedpo_pairs.jsonl").open()]
    for row in rows:
        for key in ("video_0", "video_1"):
            row[key] = str(ROOT / "recipes" / "data" / row[key])
    if edit:
        edit(rows)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "pairs.jsonl")


def prepare(tmp_path, edit=None, **method_args):
    from trl_plus import load_recipe
    from trl_plus.testing import checked_split

    recipe = load_recipe({"method": "densedpo", "method_args": method_args,
                          "model": {"kind": "diffusion", "name_or_path": "tiny-wan"},
                          "data": {"train": {"path": write_rows(tmp_path, edit)}}})  # fmt: skip
    return checked_split(recipe).to_list()


def test_rows_of_latent_files_get_their_segments(tmp_path):
    rows = prepare(tmp_path)
    assert [r["segment_ids"] for r in rows] == [[0] * 4 + [1] * 4] * 2 + [[0] * 3 + [1] * 5, [0] * 4 + [1] * 4]
    tie = prepare(tmp_path / "tie", lambda rows: rows[0].update(labels=[0, 0]))
    assert len(tie) == 3  # the all-tie pair is dropped


@pytest.mark.parametrize("edit, args, expected", [
    (lambda rows: rows[1].update(labels=[1, 2]), {}, "row 2: labels must be +1"),
    (lambda rows: rows[0].update(labels=[1, -1, 1]), {}, "row 1: 3 labels for 2 segments"),
    (lambda rows: rows[2].update(segments=[3, 4]), {}, "row 3: segments: segment lengths [3, 4] add up to 7"),
    (None, {"segment_frames": 3}, "row 1: 2 labels for 3 segments"),
    (lambda rows: rows[0].update(video_1=rows[0]["video_1"] + ".missing.pt"), {}, "no such latent file"),
], ids=["label-value", "label-count", "segment-sum", "segment-frames", "missing-file"])  # fmt: skip
def test_bad_rows_are_one_line(tmp_path, edit, args, expected):
    with pytest.raises(TrlPlusError) as info:
        prepare(tmp_path, edit, **args)
    assert expected in str(info.value) and "\n" not in str(info.value) and "pairs.jsonl" in str(info.value)
