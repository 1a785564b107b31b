"""LD-DPO: the card's worked example and special cases, gradients, TRL's ld_alpha, real steps, the recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trl import DPOConfig, DPOTrainer
from trl_plus_ld_dpo import LDDPO, desensitized_logps

from trl_plus.methods.dpo import DPO
from trl_plus.testing import make_context, perturb, preference_rows, run_recipe_on_cpu, train_tiny
from trl_plus.tiny import build_tokenizer
from trl_plus.trainer import PlusTrainer

ROOT = Path(__file__).resolve().parents[3]

# Card worked example (shared/methods/ld-dpo.md), beta = 0.1, per-token log-probs.
POLICY = [
    [[-1.0, -0.5, -0.8], [-0.3, -0.6, -0.9, -1.2]],  # chosen, pairs 1 and 2
    [[-0.7, -1.2, -0.4, -0.9, -1.1], [-1.5, -0.8]],  # rejected
]
REFERENCE = [
    [[-1.1, -0.6, -0.7], [-0.4, -0.5, -1.0, -1.0]],
    [[-0.8, -1.0, -0.5, -0.8, -1.0], [-1.2, -0.9]],
]


def pair(i):
    return make_context([[s[i]] for s in POLICY], [[s[i]] for s in REFERENCE])


@pytest.mark.parametrize(
    "alpha, per_pair, mean",
    [(0.5, [0.683197, 0.685675], 0.684436), (1.0, [0.678260, 0.688160], 0.683210), (0.0, [0.688160, 0.683197], 0.685678)],
)
def test_card_worked_example(alpha, per_pair, mean):
    assert LDDPO(beta=0.1, alpha=alpha).loss(make_context(POLICY, REFERENCE)).loss.item() == pytest.approx(mean, abs=1e-6)
    for i, expected in enumerate(per_pair):
        assert LDDPO(beta=0.1, alpha=alpha).loss(pair(i)).loss.item() == pytest.approx(expected, abs=1e-6)


def test_eq11_equals_eq12():
    # tail tokens [-0.7, -1.2, -0.4, -0.9, -1.1] with l_p = 3, alpha = 0.5 -> both -3.3
    ctx = make_context([[[-1.0, -1.0, -1.0]], [[-0.7, -1.2, -0.4, -0.9, -1.1]]])
    got = desensitized_logps(ctx.token_logps, ctx.mask, 0.5)[1].item()
    tokens = [-0.7, -1.2, -0.4, -0.9, -1.1]
    eq12 = 0.5 * sum(tokens) + (1 - 0.5) * sum(tokens[:3])
    assert got == pytest.approx(-3.3, abs=1e-12) and eq12 == pytest.approx(-3.3, abs=1e-12)


def test_alpha_one_is_dpo_and_equal_lengths_are_dpo_for_any_alpha():
    ctx = make_context(POLICY, REFERENCE)
    dpo = DPO(beta=0.1).loss(make_context(POLICY, REFERENCE)).loss.item()
    assert LDDPO(beta=0.1, alpha=1.0).loss(ctx).loss.item() == pytest.approx(dpo, abs=1e-12)
    same_len_policy = [[[-1.0, -0.5, -0.8]], [[-0.7, -1.2, -0.4]]]
    same_len_ref = [[[-1.1, -0.6, -0.7]], [[-0.8, -1.0, -0.5]]]
    dpo = DPO(beta=0.1).loss(make_context(same_len_policy, same_len_ref)).loss.item()
    for alpha in (0.0, 0.3, 0.7):
        got = LDDPO(beta=0.1, alpha=alpha).loss(make_context(same_len_policy, same_len_ref)).loss.item()
        assert got == pytest.approx(dpo, abs=1e-12)


def test_loss_is_log2_at_init_for_every_alpha():
    for alpha in (0.0, 0.5, 1.0):
        assert LDDPO(alpha=alpha).loss(make_context(POLICY, POLICY)).loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_tail_gradient_is_scaled_by_alpha_and_signs():
    alpha = 0.3
    ld = make_context(POLICY, REFERENCE)
    LDDPO(beta=0.1, alpha=alpha).loss(ld).loss.backward()
    g = ld.token_logps.grad
    # pair 1: the rejected response is longer (5 vs 3): its tokens 4, 5 have alpha times the shared tokens' gradient
    assert g[1, 0, 3].item() == pytest.approx(alpha * g[1, 0, 0].item(), rel=1e-12)
    assert g[1, 0, 4].item() == pytest.approx(alpha * g[1, 0, 0].item(), rel=1e-12)
    # pair 2: the chosen response is longer (4 vs 2)
    assert g[0, 1, 2].item() == pytest.approx(alpha * g[0, 1, 0].item(), rel=1e-12)
    assert (g[0][ld.mask[0] > 0] < 0).all() and (g[1][ld.mask[1] > 0] > 0).all()
    assert (g[ld.mask == 0] == 0).all()


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_matches_trl_ld_alpha_on_the_same_batch(tiny_model_dir, tmp_path, alpha):
    from datasets import Dataset

    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(preference_rows(8))
    common = dict(output_dir=str(tmp_path), report_to="none", bf16=False, gradient_checkpointing=False,
                  dataloader_pin_memory=False)  # fmt: skip
    trl = DPOTrainer(tiny_model_dir, args=DPOConfig(ld_alpha=alpha, **common), train_dataset=dataset,
                     processing_class=tokenizer)  # fmt: skip
    plus = PlusTrainer(tiny_model_dir, args=DPOConfig(**common), method="ld-dpo", method_args={"alpha": alpha},
                       train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    batches = []
    for trainer in (trl, plus):
        perturb(trainer.model)
        trainer.model.eval()
        batches.append(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    lengths = batches[0]["completion_mask"].sum(1).view(2, -1)
    assert (lengths[0] != lengths[1]).any()  # the pairs have tails
    with torch.no_grad():
        expected = trl.compute_loss(trl.model, batches[0]).item()
        got = plus.compute_loss(plus.model, batches[1]).item()
    assert abs(expected - math.log(2)) > 1e-3
    assert got == pytest.approx(expected, abs=1e-6)


def test_a_few_steps_raise_the_margin(tmp_path):
    logs = [e for e in train_tiny("ld-dpo", tmp_path, max_steps=8).state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]


def test_config_rejects_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        LDDPO(alpha=1.5)
    with pytest.raises(ValidationError):
        LDDPO(alph=0.5)


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = run_recipe_on_cpu("recipes/ld-dpo.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
