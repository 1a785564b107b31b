"""SimPO: the card's worked example and special cases, gradients, TRL's CPO `simpo` loss, no reference ever."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from trl.experimental.cpo import CPOTrainer
from trl_plus_simpo import SimPO

from trl_plus.testing import make_context, preference_rows, run_recipe_on_cpu, train_tiny
from trl_plus.tiny import build_model, build_tokenizer
from trl_plus.trainer import PlusTrainer

ROOT = Path(__file__).resolve().parents[3]


def spread(total, n):
    return [total / n] * n


# Card worked example: pair 1 ℓ(y_w) = −12 over 10 tokens, ℓ(y_l) = −15 over 12; pair 2 −20 over 16, −18 over 8.
CARD = [[spread(-12, 10), spread(-20, 16)], [spread(-15, 12), spread(-18, 8)]]


def test_card_worked_example():
    assert SimPO(beta=2.0, gamma_beta_ratio=0.5).loss(make_context(CARD)).loss.item() == pytest.approx(0.777208, abs=1e-6)
    for i, expected in enumerate([1.24115, 0.313262]):
        pair = make_context([[s[i]] for s in CARD])
        assert SimPO(beta=2.0, gamma_beta_ratio=0.5).loss(pair).loss.item() == pytest.approx(expected, abs=1e-5)
    # sft_weight 0.5 adds 0.5 × the token-mean chosen NLL (32 / 26)
    with_sft = SimPO(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.5).loss(make_context(CARD))
    assert with_sft.loss.item() == pytest.approx(1.39259, abs=1e-5)
    assert with_sft.metrics["simpo/sft_loss"].item() == pytest.approx(32 / 26, abs=1e-12)


def test_equal_rewards_give_log_one_plus_exp_gamma():
    same = make_context([[[-1.0, -2.0]], [[-1.5]]])  # r̄_w = r̄_l = −1.5
    assert SimPO(beta=2.0, gamma=1.0).loss(same).loss.item() == pytest.approx(1.313262, abs=1e-6)
    assert SimPO(beta=2.0, gamma=0.0).loss(same).loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_duplicating_tokens_leaves_the_loss_unchanged():
    doubled = [[seq + seq for seq in side] for side in CARD]
    config = dict(beta=2.0, gamma_beta_ratio=0.5)
    assert SimPO(**config).loss(make_context(doubled)).loss.item() == pytest.approx(
        SimPO(**config).loss(make_context(CARD)).loss.item(), abs=1e-12
    )


def test_ratio_and_absolute_margin_agree_and_loss_grows_with_gamma():
    ratio = SimPO(beta=2.5, gamma_beta_ratio=0.4).loss(make_context(CARD)).loss.item()
    absolute = SimPO(beta=2.5, gamma=1.0).loss(make_context(CARD)).loss.item()
    assert ratio == pytest.approx(absolute, abs=1e-12)
    losses = [SimPO(beta=2.0, gamma=g).loss(make_context(CARD)).loss.item() for g in (0.0, 0.5, 1.0, 2.0)]
    assert losses == sorted(losses) and len(set(losses)) == 4


def test_gradient_signs_and_magnitude():
    beta, gamma = 2.0, 1.0
    ctx = make_context(CARD)
    SimPO(beta=beta, gamma=gamma).loss(ctx).loss.backward()
    grad = ctx.token_logps.grad
    r_w, r_l = torch.tensor([-1.2, -1.25]), torch.tensor([-1.25, -2.25])
    dl_dr = -beta * torch.sigmoid(-(beta * (r_w - r_l) - gamma)) / 2  # ∂L/∂r̄_w per pair, mean over B = 2
    for i, n_w in enumerate([10, 16]):
        assert grad[0, i, 0].item() == pytest.approx(dl_dr[i].item() / n_w, rel=1e-6)  # r̄ = sum / n
    assert (grad[0][ctx.mask[0] > 0] < 0).all() and (grad[1][ctx.mask[1] > 0] > 0).all()


def test_config_validation():
    with pytest.raises(ValidationError, match="not both"):
        SimPO(gamma=1.0, gamma_beta_ratio=0.5)
    with pytest.raises(ValidationError):
        SimPO(gama=1.0)
    assert SimPO().config.margin_ratio == 0.25 and SimPO(beta=2.0, gamma=1.6).config.margin_ratio == 0.8


def test_matches_trl_cpo_simpo_loss_on_a_real_batch(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    beta, gamma = 2.0, 1.0
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, gradient_checkpointing=False,
                     dataloader_pin_memory=False)  # fmt: skip
    plus = PlusTrainer(model, args=args, method="simpo", method_args={"beta": beta, "gamma": gamma},
                       train_dataset=Dataset.from_list(preference_rows(8)), processing_class=tokenizer)  # fmt: skip
    plus.model.eval()
    batch = plus.data_collator([plus.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        ours = plus.compute_loss(plus.model, batch).item()
        logits = plus.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        average = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        chosen, rejected = average.chunk(2)
        trl_self = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0,
                                   accelerator=SimpleNamespace(device=chosen.device))  # fmt: skip
        trl_loss = CPOTrainer.cpo_loss(trl_self, chosen, rejected)[0].mean().item()  # cpo_alpha = 0: no NLL term
    assert ours == pytest.approx(trl_loss, abs=1e-6)


def test_no_reference_forward_and_the_margin_grows(tmp_path):
    trainer = train_tiny("simpo", tmp_path, method_args={"beta": 2.0, "gamma_beta_ratio": 0.5}, max_steps=8)
    assert trainer.ref_model is None and trainer.reference_mode == "none"
    calls = []
    handle = trainer.model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    handle.remove()
    assert len(calls) == 1
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = run_recipe_on_cpu("recipes/simpo.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
