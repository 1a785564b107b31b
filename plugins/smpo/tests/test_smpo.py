"""SmPO: the card's worked example, p = 0.5 and θ = θ_ref give log 2, the bound of the effective β, the inverted
latents and implied-noise target (0 inverse steps: x̃ = x0), and the reduction to diffusion-dpo (no inversion,
γ(2p − 1) = 1) on the same draws."""

from __future__ import annotations

import math

import pytest
import torch
from trl_plus_smpo import SmPO, preference_probability

from trl_plus import ddim_invert
from trl_plus.testing import (
    diffusion_batch,
    diffusion_loss,
    diffusion_rows,
    make_context,
    perturb,
    tiny_diffusion_trainer,
)

# the diffusion-dpo card's pair 1 (ℓ = −½·ē): e_θ^w 0.1, e_θ^l 0.2, e_ref^w 0.1002, e_ref^l 0.1999
POLICY, REFERENCE = [[[-0.05]], [[-0.1]]], [[[-0.0501]], [[-0.09995]]]


def scored(chosen, rejected, n=1):
    return {"chosen_score": torch.full((n,), chosen, dtype=torch.float64),
            "rejected_score": torch.full((n,), rejected, dtype=torch.float64)}  # fmt: skip


def rows_with_scores(n, chosen=0.23, rejected=0.22):
    return [{**row, "chosen_score": chosen, "rejected_score": rejected} for row in diffusion_rows(n)]


def test_card_worked_example():
    p = preference_probability(torch.tensor(0.23, dtype=torch.float64), torch.tensor(0.22, dtype=torch.float64),
                               0.11543526500463486, 0.28201571106910706)  # fmt: skip
    assert p.item() == pytest.approx(0.515003, abs=5e-7)
    for beta, loss in ((2000, 0.649150), (5000, 0.586940)):
        out = SmPO(beta=beta).loss(make_context(POLICY, REFERENCE, batch=scored(0.23, 0.22)))
        assert out.metrics["smpo/factor"].item() == pytest.approx(0.300065, abs=5e-7)
        assert out.loss.item() == pytest.approx(loss, abs=5e-7)


def test_equal_rewards_give_log2_and_no_gradient():
    ctx = make_context(POLICY, REFERENCE, batch=scored(0.2, 0.2))
    out = SmPO().loss(ctx)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12) and bool((ctx.token_logps.grad == 0).all())


def test_swapping_the_scores_is_swapping_the_pair():
    ours = SmPO().loss(make_context(POLICY, REFERENCE, batch=scored(0.22, 0.23))).loss
    swapped = SmPO().loss(make_context(POLICY[::-1], REFERENCE[::-1], batch=scored(0.23, 0.22))).loss
    assert ours.item() == pytest.approx(swapped.item(), abs=1e-12)


def test_effective_beta_is_at_most_4_62_beta():
    p = preference_probability(torch.tensor(PMAX := 0.28201571106910706), torch.tensor(0.11543526500463486),
                               0.11543526500463486, PMAX)  # fmt: skip
    assert (10 * (2 * p - 1)).item() == pytest.approx(4.62117, abs=5e-6)


def test_inverted_latents_and_implied_noise_target(tmp_path):
    trainer = tiny_diffusion_trainer("smpo", tmp_path, rows=rows_with_scores(4), batch_size=4)
    batch = diffusion_batch(trainer)
    score = trainer.score(trainer.model, batch, torch.Generator().manual_seed(0))
    t = score.noised.t
    assert torch.equal(t[:4], t[4:])  # one t per pair
    x0 = batch["x0"]
    cond = trainer.conditioning(batch["prompt_ids"], batch["group"], torch.float32, x0.device)
    expected = ddim_invert(trainer.model, x0, cond, trainer.scorer.scheduler, 5, until=t, renoise=1).latent
    assert torch.allclose(score.noised.x_t, expected, atol=1e-6)
    alpha = trainer.scorer.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(score.noised.target, (expected - alpha.sqrt() * x0) / (1 - alpha).sqrt(), atol=1e-5)
    # 0 inverse steps (t = 0 ≤ the first inverse timestep): x̃ = x0, τ_t = x0·(1 − √ᾱ_t)/√(1 − ᾱ_t)
    none = ddim_invert(trainer.model, x0, cond, trainer.scorer.scheduler, 5, until=0).latent
    assert torch.equal(none, x0)


def test_at_init_the_loss_is_log2(tmp_path):
    trainer = tiny_diffusion_trainer("smpo", tmp_path, rows=rows_with_scores(4, 0.27, 0.13), batch_size=4)
    batch = diffusion_batch(trainer)
    assert diffusion_loss(trainer, batch, seed=1).loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_without_inversion_and_unit_factor_it_is_diffusion_dpo(tmp_path):
    chosen, rejected = 0.23, 0.22
    p = preference_probability(torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64),
                               0.11543526500463486, 0.28201571106910706).item()  # fmt: skip
    rows = rows_with_scores(4, chosen, rejected)
    ours = tiny_diffusion_trainer("smpo", tmp_path / "s", rows=rows, batch_size=4, training={"share_noise": True},
                                  method_args={"inversion": False, "gamma": 1 / (2 * p - 1), "beta": 5000})
    theirs = tiny_diffusion_trainer("diffusion-dpo", tmp_path / "d", rows=rows, batch_size=4)
    for t in (ours, theirs):
        perturb(t.model, seed=1, scale=0.02)
    a = diffusion_loss(ours, diffusion_batch(ours), seed=3).loss
    b = diffusion_loss(theirs, diffusion_batch(theirs), seed=3).loss
    assert a.item() == pytest.approx(b.item(), abs=1e-6) and abs(a.item() - math.log(2)) > 1e-3


def test_a_label_that_swaps_the_images_swaps_the_scores_too(tmp_path):
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from datasets import Dataset

    source = [json.loads(line) for line in open("recipes/data/diffusion_scored_pairs.jsonl")][:2]
    rows = [{**row, "label_0": label} for row, label in zip(source, (1, 0))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for row in rows:  # absolute image paths (the file lives elsewhere)
        for key in ("chosen", "rejected"):
            row[key] = str((Path("recipes/data") / row[key]).resolve())
    recipe = SimpleNamespace(data=SimpleNamespace(train=SimpleNamespace(path=str(path), label="label_0"), ties="drop"),
                             model=SimpleNamespace(resolution=None))  # fmt: skip
    out = SmPO().prepare_split(Dataset.from_list(rows), recipe, "train").to_list()
    assert (out[0]["chosen_score"], out[0]["rejected_score"]) == (rows[0]["chosen_score"], rows[0]["rejected_score"])
    assert (out[1]["chosen_score"], out[1]["rejected_score"]) == (rows[1]["rejected_score"], rows[1]["chosen_score"])
    assert out[1]["chosen"] == rows[1]["rejected"]  # the images swapped with them
