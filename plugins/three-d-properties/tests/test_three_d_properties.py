"""3D-Properties (Flex-DPO, SFT-regularised DPO): the card's worked example and special cases, gradients,
equality with the core dpo loss in a trainer step, real steps, the recipe, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl import DPOConfig
from trl_plus_three_d_properties import ThreeDProperties

from trl_plus import DPO, PlusTrainer
from trl_plus.testing import build_tokenizer, make_context, perturb, preference_rows, run_recipe_on_cpu, train_tiny

ROOT = Path(__file__).resolve().parents[3]

# The DPO card's two pairs as sequence sums: ℓθ(y_w) = −12, −20; ℓθ(y_l) = −15, −18; ℓref(y_w) = −13, −19;
# ℓref(y_l) = −14, −18.5, i.e. ρ_w = [1, −1], ρ_l = [−1, 0.5].
POLICY = [[[-12.0], [-20.0]], [[-15.0], [-18.0]]]
REFERENCE = [[[-13.0], [-19.0]], [[-14.0], [-18.5]]]


def card_context():
    """Both pairs of the card."""
    return make_context(POLICY, REFERENCE)


def card_pair(i):
    """Pair ``i`` of the card alone."""
    return make_context([[side[i]] for side in POLICY], [[side[i]] for side in REFERENCE])


def test_card_worked_example_flex_dpo():
    method = ThreeDProperties(beta_chosen=0.1, beta_rejected=0.08, sft_weight=0.0)
    out = method.loss(card_context())
    assert out.loss.item() == pytest.approx(0.686393, abs=1e-6)
    margins = out.rewards[0] - out.rewards[1]  # the Flex-DPO logits β₊ρ_w − β₋ρ_l
    assert margins.tolist() == pytest.approx([0.18, -0.14], abs=1e-12)
    for i, expected in enumerate([0.607192, 0.765595]):
        assert method.loss(card_pair(i)).loss.item() == pytest.approx(expected, abs=1e-6)


def test_card_worked_example_sft_regularised():
    method = ThreeDProperties(beta_chosen=0.1, beta_rejected=0.1, sft_weight=0.1)
    out = method.loss(card_context())
    assert out.loss.item() == pytest.approx(2.28455, abs=1e-5)
    assert out.metrics["three_d/flex_dpo_loss"].item() == pytest.approx((0.598139 + 0.770957) / 2, abs=1e-6)
    assert out.metrics["three_d/sft_loss"].item() == pytest.approx(0.1 * (12 + 20) / 2, abs=1e-12)
    for i, (dpo, sft) in enumerate([(0.598139, 1.2), (0.770957, 2.0)]):
        assert method.loss(card_pair(i)).loss.item() == pytest.approx(dpo + sft, abs=1e-6)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_equal_betas_and_no_sft_is_the_core_dpo_loss(beta):
    ours = ThreeDProperties(beta_chosen=beta, beta_rejected=beta, sft_weight=0.0).loss(card_context())
    dpo = DPO(beta=beta).loss(card_context())
    assert ours.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)
    assert torch.allclose(ours.rewards, dpo.rewards, atol=1e-12)


def test_loss_is_log2_at_init_and_sft_term_scales_with_length():
    same = make_context(POLICY, POLICY)
    assert ThreeDProperties().loss(same).loss.item() == pytest.approx(math.log(2), abs=1e-12)
    short = make_context([[[-1.0] * 2], [[-1.0]]], [[[-1.0] * 2], [[-1.0]]])
    long = make_context([[[-1.0] * 6], [[-1.0]]], [[[-1.0] * 6], [[-1.0]]])
    sft = [ThreeDProperties(sft_weight=0.3).loss(c).metrics["three_d/sft_loss"].item() for c in (short, long)]
    assert sft == pytest.approx([0.3 * 2, 0.3 * 6], abs=1e-12)  # token-sum NLL: linear in the chosen length


@pytest.mark.parametrize("beta_rejected", [0.01, 0.08, 0.1, 0.2])
def test_flex_gradient_ratio_is_beta_rejected_over_beta_chosen(beta_rejected):
    beta_chosen = 0.1
    ctx = card_context()
    ThreeDProperties(beta_chosen=beta_chosen, beta_rejected=beta_rejected).loss(ctx).loss.backward()
    g = ctx.token_logps.grad[:, :, 0]  # [2, B]: ∂L/∂ℓθ(y_w), ∂L/∂ℓθ(y_l)
    assert (g[0] < 0).all() and (g[1] > 0).all()  # push chosen up, rejected down
    assert (g[1].abs() / g[0].abs()).tolist() == pytest.approx([beta_rejected / beta_chosen] * 2, rel=1e-12)
    # by hand: ∂L/∂ℓθ(y_w) = −β₊ σ(−z)/B with z = β₊ρ_w − β₋ρ_l
    for i, (rho_w, rho_l) in enumerate([(1.0, -1.0), (-1.0, 0.5)]):
        z = beta_chosen * rho_w - beta_rejected * rho_l
        assert g[0, i].item() == pytest.approx(-beta_chosen / (1 + math.exp(z)) / 2, rel=1e-12)


def test_sft_gradient_is_dpo_minus_gamma_over_b_on_chosen_only():
    gamma = 0.1
    ours, dpo = card_context(), card_context()
    ThreeDProperties(beta_chosen=0.1, beta_rejected=0.1, sft_weight=gamma).loss(ours).loss.backward()
    DPO(beta=0.1).loss(dpo).loss.backward()
    g, g_dpo = ours.token_logps.grad, dpo.token_logps.grad
    assert (g[0] - g_dpo[0]).flatten().tolist() == pytest.approx([-gamma / 2] * 2, abs=1e-15)
    assert torch.equal(g[1], g_dpo[1])
    assert g_dpo[0, :, 0].tolist() == pytest.approx([-0.0225083, -0.0268715], abs=1e-7)  # the DPO card's values


def trainer_losses(model_dir, output_dir, configs):
    """The core ``dpo`` and ``three-d-properties`` (one per config) on the same perturbed weights and batch."""
    from datasets import Dataset

    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(preference_rows(8))
    args = dict(output_dir=str(output_dir), report_to="none", bf16=False, gradient_checkpointing=False,
                dataloader_pin_memory=False)  # fmt: skip
    trainers = [PlusTrainer(model_dir, args=DPOConfig(**args), method="dpo", method_args={"beta": 0.1},
                            train_dataset=dataset, processing_class=tokenizer)]  # fmt: skip
    trainers += [
        PlusTrainer(model_dir, args=DPOConfig(**args), method="three-d-properties", method_args=config,
                    train_dataset=dataset, processing_class=tokenizer)
        for config in configs
    ]  # fmt: skip
    for trainer in trainers:
        perturb(trainer.model)  # the same noise for all: the policy leaves the reference (loss ≠ log 2)
        trainer.model.eval()
    batch = trainers[0].data_collator([trainers[0].train_dataset[i] for i in range(8)])
    with torch.no_grad():
        losses = [t.compute_loss(t.model, batch).item() for t in trainers]
    chosen_logps = trainers[0]._metrics["eval"]["logps/chosen"][-1]  # mean ℓθ(y_w) of the batch
    return losses[0], losses[1:], chosen_logps


def test_trainer_step_equal_betas_is_core_dpo_and_sft_adds_gamma_nll(tiny_model_dir, tmp_path):
    configs = [
        {"beta_chosen": 0.1, "beta_rejected": 0.1, "sft_weight": 0.0},
        {"beta_chosen": 0.1, "beta_rejected": 0.08, "sft_weight": 0.0},
        {"beta_chosen": 0.1, "beta_rejected": 0.1, "sft_weight": 0.01},
    ]
    dpo, (same, flex, sft), chosen_logps = trainer_losses(tiny_model_dir, tmp_path, configs)
    assert abs(dpo - math.log(2)) > 1e-3  # the perturbation moved the loss away from log 2
    assert same == pytest.approx(dpo, abs=1e-6)
    assert abs(flex - dpo) > 1e-4  # β₋ ≠ β₊ is not DPO
    assert sft == pytest.approx(dpo - 0.01 * chosen_logps, abs=1e-5)


def test_a_few_steps_raise_the_flex_margin(tmp_path):
    trainer = train_tiny("three-d-properties", tmp_path, method_args={"sft_weight": 0.01}, max_steps=8)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["three_d/flex_dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5  # β₊ρ_w − β₋ρ_l
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]
    assert logs[-1]["three_d/sft_loss"] < logs[0]["three_d/sft_loss"]  # the chosen responses became more likely


def test_clear_errors():
    with pytest.raises(ValidationError):
        ThreeDProperties(beta_rejected=0.0)
    with pytest.raises(ValidationError):
        ThreeDProperties(sft_weight=-0.1)
    with pytest.raises(ValidationError, match="beta"):
        ThreeDProperties(beta=0.1)  # the paper's single β is beta_chosen = beta_rejected here: a typo is an error
    no_reference = make_context(POLICY)
    with pytest.raises(RuntimeError, match="reference"):
        ThreeDProperties().loss(no_reference)


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/three-d-properties.yaml").read_text())
    assert recipe["method"] == "three-d-properties" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/three-d-properties.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
