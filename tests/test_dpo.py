"""The built-in DPO: the card's worked example, special cases, gradients, and equality with TRL's DPOTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from trl import DPOTrainer

from conftest import first_batch, perturb
from trl_plus.builtin.dpo import DPO
from trl_plus.models.tiny import build_tokenizer
from trl_plus.testing import make_context, run_recipe_on_cpu
from trl_plus.trainers.preference import PlusTrainer

# Card worked example (shared/methods/dpo.md), beta = 0.1, sequence log-prob sums.
POLICY = [[[-12.0], [-20.0]], [[-15.0], [-18.0]]]  # [chosen pairs], [rejected pairs]
REFERENCE = [[[-13.0], [-19.0]], [[-14.0], [-18.5]]]


def card_loss(**config):
    ctx = make_context(POLICY, REFERENCE)
    out = DPO(config).loss(ctx)
    return ctx, out


def test_worked_example_loss_and_gradients():
    ctx, out = card_loss(beta=0.1)
    assert out.loss.item() == pytest.approx(0.684548, abs=1e-6)
    out.loss.backward()
    grad = ctx.token_logps.grad[..., 0]
    assert grad[0].tolist() == pytest.approx([-0.0225083, -0.0268715], abs=1e-7)
    assert grad[1].tolist() == pytest.approx([0.0225083, 0.0268715], abs=1e-7)
    # per-pair losses (one pair per context) and the logged rewards beta * log-ratio
    for i, expected in enumerate([0.598139, 0.770957]):
        pair = make_context([[s[i]] for s in POLICY], [[s[i]] for s in REFERENCE])
        assert DPO(beta=0.1).loss(pair).loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.rewards.flatten().tolist() == pytest.approx([0.1, -0.1, -0.1, 0.05])


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"loss_type": "ipo", "ipo_normalize_by_length": False}, 25.625),
        ({"loss_type": "hinge"}, 0.975),
        ({"label_smoothing": 0.1}, 0.687048),
    ],
)
def test_worked_example_variants(config, expected):
    assert card_loss(beta=0.1, **config)[1].loss.item() == pytest.approx(expected, abs=1e-6)


def test_at_init_loss_is_log2_and_ipo_is_quarter_beta_squared():
    same = [[[-3.0, -1.0], [-2.0]], [[-4.0], [-0.5, -0.5, -1.0]]]
    out = DPO(beta=0.3).loss(make_context(same, same))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    ipo = DPO(beta=0.3, loss_type="ipo", ipo_normalize_by_length=False).loss(make_context(same, same))
    assert ipo.loss.item() == pytest.approx(1 / (4 * 0.3**2), abs=1e-12)


def test_swap_and_shift_properties():
    beta = 0.1
    base = card_loss(beta=beta)[1].loss
    swapped = DPO(beta=beta).loss(make_context(POLICY[::-1], REFERENCE[::-1])).loss
    # L(Δ) − L(−Δ) = −βΔ per pair, averaged: −β·mean(Δ) = −0.1·0.25
    assert (base - swapped).item() == pytest.approx(-beta * (2.0 - 1.5) / 2, abs=1e-9)
    shifted = [[[v[0] + 7.0] for v in seqs] for seqs in POLICY]
    assert DPO(beta=beta).loss(make_context(shifted, REFERENCE)).loss.item() == pytest.approx(base.item(), abs=1e-12)


def test_config_is_validated():
    with pytest.raises(ValidationError):
        DPO(beta=-1)
    with pytest.raises(ValidationError, match="extra"):
        DPO(betta=0.1)


@pytest.mark.parametrize("mode", ["model", "precomputed"])
def test_matches_trl_dpo_trainer_on_the_same_batch(tiny_model_dir, dpo_args, pref_dataset, mode):
    tokenizer = build_tokenizer()
    trl = DPOTrainer(tiny_model_dir, args=dpo_args(), train_dataset=pref_dataset, processing_class=tokenizer)
    plus = PlusTrainer(
        tiny_model_dir, args=dpo_args(), method="dpo", reference_mode=mode, train_dataset=pref_dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    for trainer in (trl, plus):
        perturb(trainer.model)
        trainer.model.eval()
    batch_trl, batch_plus = first_batch(trl), first_batch(plus)
    assert torch.equal(batch_trl["input_ids"], batch_plus["input_ids"])
    with torch.no_grad():
        expected = trl.compute_loss(trl.model, batch_trl)
        got = plus.compute_loss(plus.model, batch_plus)
    assert abs(expected.item() - math.log(2)) > 1e-3  # not at init
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    keys = ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "entropy", "logits/chosen",
            "logits/rejected", "mean_token_accuracy")  # fmt: skip
    for key in keys:
        assert plus._metrics["eval"][key][-1] == pytest.approx(trl._metrics["eval"][key][-1], abs=1e-5), key


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    result = run_recipe_on_cpu("recipes/dpo.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
