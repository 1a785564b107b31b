"""SSDPO: the card's worked example, the loser never being the winner, and its reductions (λ1 = 0 with a given
loser ≡ diffusion-dpo on the same pairs; at init the loss is ½·ē_θ^w + ½·log 2)."""

from __future__ import annotations

import math

import pytest
import torch
from trl_plus_ssdpo import SSDPO, RandomLoserCollator, derangement

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


def test_card_worked_example():
    # e_θ^w 0.1, e_ref^w 0.1002, e_θ^sl 0.2, e_ref^sl 0.1999 (ℓ = −½·e): Self-DPO 0.386871, total 0.243436
    ctx = make_context([[[-0.05]], [[-0.1]]], [[[-0.0501]], [[-0.09995]]])
    out = SSDPO().loss(ctx)
    assert out.metrics["ssdpo/dpo"].item() == pytest.approx(0.386871, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.243436, abs=1e-6)


def test_the_loser_is_never_the_winner():
    for size in (2, 3, 7):
        for _ in range(20):
            perm = derangement(size)
            assert sorted(perm.tolist()) == list(range(size)) and bool((perm != torch.arange(size)).all())
    with pytest.raises(TrlPlusError, match="batch_size >= 2"):
        derangement(1)
    rows = [{"x0": torch.full((1, 1, 2, 2), float(i)), "prompt_id": i} for i in range(4)]
    collator = SSDPO().batch_collator()
    assert isinstance(collator, RandomLoserCollator)
    batch = collator(rows)
    winners, losers = batch["x0"][:4, 0, 0, 0], batch["x0"][4:, 0, 0, 0]
    assert winners.tolist() == [0, 1, 2, 3] and torch.equal(losers, winners[batch["loser_index"]])
    assert bool((losers != winners).all()) and batch["prompt_ids"].tolist() == [0, 1, 2, 3]


def test_without_sft_it_is_diffusion_dpo_on_the_same_pairs(tmp_path):
    rows = [{"prompt": r["prompt"], "x0": r["x0"][:1]} for r in diffusion_rows(4)]  # (prompt, image) rows
    trainer = tiny_diffusion_trainer("ssdpo", tmp_path / "s", rows=rows, batch_size=4,
                                     method_args={"sft_weight": 0.0, "dpo_weight": 1.0})  # fmt: skip
    batch = diffusion_batch(trainer)
    pairs = [{"prompt": rows[i]["prompt"], "x0": torch.cat([rows[i]["x0"], rows[j]["x0"]])}
             for i, j in enumerate(batch["loser_index"].tolist())]  # fmt: skip
    reference = tiny_diffusion_trainer("diffusion-dpo", tmp_path / "d", rows=pairs, batch_size=4)
    same = diffusion_batch(reference)
    assert torch.equal(batch["x0"], same["x0"])
    for t in (trainer, reference):
        perturb(t.model, seed=1, scale=0.02)  # the policies leave their (frozen-copy) references, identically
    ours, theirs = diffusion_loss(trainer, batch, seed=3).loss, diffusion_loss(reference, same, seed=3).loss
    assert ours.item() == theirs.item() and abs(ours.item() - math.log(2)) > 1e-3


def test_at_init_the_loss_is_half_the_winner_error_plus_half_log2(tmp_path):
    rows = [{"prompt": r["prompt"], "x0": r["x0"][:1]} for r in diffusion_rows(4)]
    trainer = tiny_diffusion_trainer("ssdpo", tmp_path, rows=rows, batch_size=4, max_steps=2, learning_rate=1e-3)
    trainer.train()
    first = training_logs(trainer)[0]
    assert first["ssdpo/dpo"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["loss"] == pytest.approx(0.5 * first["ssdpo/sft"] + 0.5 * math.log(2), abs=1e-6)
