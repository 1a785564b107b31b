"""RankDPO: the card's worked example and gradient, its invariances, log 2·ΣΔ at init, and K = 2 with unit weights
≡ diffusion-dpo at twice β on the same draws; the list rows through the recipe path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trl_plus_rankdpo import RankDPO, pair_weights

from trl_plus import LossContext
from trl_plus.testing import (
    diffusion_batch,
    diffusion_loss,
    diffusion_rows,
    perturb,
    tiny_diffusion_trainer,
)

ROOT = Path(__file__).resolve().parents[3]
PHI = [0.9, 0.5, 0.1]
S = [0.0002, -0.0001, 0.0003]


def s_context(s, phi):
    """One prompt, K images, policy errors e = s and reference errors 0 (ℓ = −½·e)."""
    e = torch.tensor(s, dtype=torch.float64).view(-1, 1, 1).requires_grad_(True)
    ctx = LossContext(token_logps=-0.5 * e, mask=torch.ones_like(e), ref_token_logps=torch.zeros_like(e),
                      batch={"scores": torch.tensor([phi], dtype=torch.float64)})  # fmt: skip
    return ctx, e


def test_card_worked_example_and_gradient():
    weights, _ = pair_weights(torch.tensor([PHI], dtype=torch.float64))
    assert weights[0, 0, 1].item() == pytest.approx(0.240591, abs=1e-6)
    assert weights[0, 0, 2].item() == pytest.approx(0.572961, abs=1e-6)
    assert weights[0, 1, 2].item() == pytest.approx(0.0646841, abs=1e-7)
    ctx, e = s_context(S, PHI)
    loss = RankDPO(beta=1000).loss(ctx).loss
    assert loss.item() == pytest.approx(0.607949, abs=1e-6)
    loss.backward()
    assert e.grad.view(-1).tolist() == pytest.approx([410.374, -112.247, -298.127], abs=1e-3)


def test_invariances_and_ties():
    base = RankDPO(beta=1000).loss(s_context(S, PHI)[0]).loss.item()
    shifted = RankDPO(beta=1000).loss(s_context([v + 0.01 for v in S], PHI)[0]).loss.item()
    order = [2, 0, 1]
    permuted = RankDPO(beta=1000).loss(s_context([S[i] for i in order], [PHI[i] for i in order])[0]).loss.item()
    assert shifted == pytest.approx(base, abs=1e-12) and permuted == pytest.approx(base, abs=1e-12)
    assert RankDPO(beta=1000).loss(s_context(S, [0.5, 0.5, 0.5])[0]).loss.item() == 0
    weights, _ = pair_weights(torch.tensor([PHI], dtype=torch.float64))
    assert RankDPO().loss(s_context([0.0] * 3, PHI)[0]).loss.item() == pytest.approx(math.log(2) * weights.sum().item())


def test_k2_with_unit_weights_is_diffusion_dpo_at_twice_beta(tmp_path):
    pairs = diffusion_rows(4)
    lists = [dict(row, scores=[1.0, 0.0]) for row in pairs]
    rank = tiny_diffusion_trainer("rankdpo", tmp_path / "r", rows=lists, batch_size=4, training={"share_noise": True},
                                  method_args={"beta": 2500.0, "pair_weights": "unit"})  # fmt: skip
    dpo = tiny_diffusion_trainer("diffusion-dpo", tmp_path / "d", rows=pairs, batch_size=4)
    for trainer in (rank, dpo):
        perturb(trainer.model, seed=1, scale=0.02)
    ours = diffusion_loss(rank, diffusion_batch(rank), seed=5).loss.item()
    theirs = diffusion_loss(dpo, diffusion_batch(dpo), seed=5).loss.item()
    assert ours == pytest.approx(theirs, rel=1e-6) and abs(ours - math.log(2)) > 1e-3


def test_list_rows_through_the_recipe_checks(tmp_path):
    import json

    from datasets import Dataset

    from trl_plus import TrlPlusError, check_recipe, load_recipe

    data = ROOT / "recipes" / "data" / "diffusion_lists.jsonl"
    recipe = load_recipe({"method": "rankdpo", "model": {"kind": "diffusion", "name_or_path": "tiny-sd"},
                          "data": {"train": {"path": str(data)}}})  # fmt: skip
    method, _ = check_recipe(recipe)
    rows = [json.loads(line) for line in data.open()]
    prepared = method.prepare_split(Dataset.from_list(rows), recipe, "train").to_list()
    assert len(prepared[0]["images"]) == 3 and all(p.startswith("/") for p in prepared[0]["images"])
    rows[1]["images"], rows[1]["scores"] = rows[1]["images"][:2], rows[1]["scores"][:2]
    with pytest.raises(TrlPlusError, match="the same number K >= 2"):
        method.prepare_split(Dataset.from_list(rows), recipe, "train")
