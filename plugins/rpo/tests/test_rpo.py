"""RPO: the card's worked example for all three normalisations, η = 0 is DPO, gradients, TRL's sft loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trl import DPOConfig, DPOTrainer
from trl_plus_rpo import RPO

from trl_plus.methods.dpo import DPO
from trl_plus.testing import make_context, perturb, preference_rows, run_recipe_on_cpu, train_tiny
from trl_plus.tiny import build_tokenizer
from trl_plus.trainer import PlusTrainer

ROOT = Path(__file__).resolve().parents[3]


def card_context():
    """The DPO card's two pairs, with chosen lengths 10 and 16 (rejected lengths 12 and 8), spread evenly."""
    def tokens(total, n):
        return [total / n] * n

    policy = [[tokens(-12, 10), tokens(-20, 16)], [tokens(-15, 12), tokens(-18, 8)]]
    reference = [[tokens(-13, 10), tokens(-19, 16)], [tokens(-14, 12), tokens(-18.5, 8)]]
    return make_context(policy, reference)


@pytest.mark.parametrize(
    "normalization, expected", [("sum", 1.00455), ("sequence_mean", 0.929548), ("token_mean", 0.930702)]
)
def test_card_worked_example(normalization, expected):
    out = RPO(beta=0.1, eta=0.2, sft_normalization=normalization).loss(card_context())
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert out.metrics["rpo/dpo_loss"].item() == pytest.approx(0.684548, abs=1e-6)


@pytest.mark.parametrize("normalization", ["sum", "sequence_mean", "token_mean"])
def test_eta_zero_is_dpo(normalization):
    got = RPO(beta=0.1, eta=0.0, sft_normalization=normalization).loss(card_context()).loss.item()
    assert got == pytest.approx(DPO(beta=0.1).loss(card_context()).loss.item(), abs=1e-12)


@pytest.mark.parametrize(
    "normalization, extra",
    [("sum", lambda beta, eta, n: eta * beta / 2), ("sequence_mean", lambda beta, eta, n: eta / (2 * n))],
)
def test_chosen_gradient_is_dpo_plus_the_sft_weight(normalization, extra):
    beta, eta = 0.1, 0.2
    rpo_ctx, dpo_ctx = card_context(), card_context()
    RPO(beta=beta, eta=eta, sft_normalization=normalization).loss(rpo_ctx).loss.backward()
    DPO(beta=beta).loss(dpo_ctx).loss.backward()
    # per-sequence gradient = per-token gradient of the first token (every token of a sequence has the same one)
    rpo_g, dpo_g = rpo_ctx.token_logps.grad[..., 0], dpo_ctx.token_logps.grad[..., 0]
    for i, n in enumerate([10, 16]):  # ∂L/∂ℓθ(y_w) is more negative by η·β/B (sum) or η/(B·|y_w|) (sequence_mean)
        assert (rpo_g[0, i] - dpo_g[0, i]).item() == pytest.approx(-extra(beta, eta, n), abs=1e-12)
    assert torch.allclose(rpo_g[1], dpo_g[1], atol=1e-15)  # the rejected gradient is DPO's
    assert (rpo_g[0] < 0).all() and (rpo_g[1] > 0).all()


def test_sum_form_scales_with_length_and_mean_forms_do_not():
    short = make_context([[[-1.0, -1.0]], [[-1.0]]], [[[-1.0, -1.0]], [[-1.0]]])
    long = make_context([[[-1.0] * 4], [[-1.0]]], [[[-1.0] * 4], [[-1.0]]])
    sft = {n: [RPO(eta=1.0, sft_normalization=n).loss(c).metrics["rpo/sft_loss"].item() for c in (short, long)]
           for n in ("sum", "sequence_mean", "token_mean")}  # fmt: skip
    assert sft["sum"][1] == pytest.approx(2 * sft["sum"][0])
    assert sft["sequence_mean"][0] == pytest.approx(sft["sequence_mean"][1])
    assert sft["token_mean"][0] == pytest.approx(sft["token_mean"][1])


def test_at_init_the_dpo_part_is_log2():
    same = [[[-1.0] * 10, [-2.0] * 16], [[-1.0] * 12, [-2.0] * 8]]
    out = RPO(beta=0.1, eta=0.2).loss(make_context(same, same))
    assert out.metrics["rpo/dpo_loss"].item() == pytest.approx(math.log(2), abs=1e-12)
    # sequence_mean: η · mean over pairs of the chosen per-token NLL (1.0 and 2.0)
    assert out.metrics["rpo/sft_loss"].item() == pytest.approx(0.2 * (1.0 + 2.0) / 2, abs=1e-12)


def test_token_mean_matches_trl_sigmoid_plus_sft(tiny_model_dir, tmp_path):
    from datasets import Dataset

    eta, beta = 0.3, 0.1
    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(preference_rows(8))
    common = dict(output_dir=str(tmp_path), report_to="none", bf16=False, gradient_checkpointing=False,
                  dataloader_pin_memory=False, beta=beta)  # fmt: skip
    trl = DPOTrainer(tiny_model_dir, args=DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, eta], **common),
                     train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    common.pop("beta")
    plus = PlusTrainer(tiny_model_dir, args=DPOConfig(**common), method="rpo",
                       method_args={"beta": beta, "eta": eta, "sft_normalization": "token_mean"},
                       train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    losses = []
    for trainer in (trl, plus):
        perturb(trainer.model)
        trainer.model.eval()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_a_few_steps_raise_the_margin(tmp_path):
    trainer = train_tiny("rpo", tmp_path, method_args={"beta": 0.1, "eta": 0.2}, max_steps=8)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rpo/sft_loss"] < logs[0]["rpo/sft_loss"]  # the chosen responses became more likely


def test_config_rejects_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RPO(sft_normalization="mean")
    with pytest.raises(ValidationError):
        RPO(eta=-0.1)


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = run_recipe_on_cpu("recipes/rpo.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
