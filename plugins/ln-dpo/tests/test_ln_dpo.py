"""LN-DPO: the card's worked example and special cases, gradients, TRL's sigmoid_norm, real steps, the recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl import DPOConfig, DPOTrainer
from trl_plus_ln_dpo import LNDPO

from trl_plus import DPO, PlusTrainer
from trl_plus.testing import build_tokenizer, make_context, perturb, preference_rows, run_recipe_on_cpu, train_tiny

ROOT = Path(__file__).resolve().parents[3]


def spread(total, n):
    """``n`` equal per-token values summing to ``total``."""
    return [total / n] * n


# Card worked example (the DPO card's pairs, β = 1): ρ_w = [1, −1], ρ_l = [−1, 0.5], |y_w| = [10, 16],
# |y_l| = [12, 8]. The policy carries the log-ratios, the reference is zero on the same tokens.
RHO = {"w": [1.0, -1.0], "l": [-1.0, 0.5]}
LEN = {"w": [10, 16], "l": [12, 8]}
POLICY = [[spread(RHO[s][i], LEN[s][i]) for i in range(2)] for s in ("w", "l")]
ZEROS = [[[0.0] * LEN[s][i] for i in range(2)] for s in ("w", "l")]


def test_card_worked_example():
    out = LNDPO(beta=1.0).loss(make_context(POLICY, ZEROS))
    assert out.loss.item() == pytest.approx(0.681638, abs=1e-6)
    for i, (z, expected) in enumerate([(0.1 + 1 / 12, 0.605676), (-0.125, 0.757599)]):
        pair = make_context([[s[i]] for s in POLICY], [[s[i]] for s in ZEROS])
        assert LNDPO(beta=1.0).loss(pair).loss.item() == pytest.approx(expected, abs=1e-6)
        assert expected == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)  # the card's logits z
    # rewards are the normalised β ρ / |y|
    expected_rewards = torch.tensor([[0.1, -1 / 16], [-1 / 12, 0.0625]], dtype=torch.float64)
    assert torch.allclose(out.rewards, expected_rewards, rtol=0, atol=1e-12)


def test_loss_is_log2_at_init():
    reference = [[[-1.0, -0.5, -0.8], [-0.3, -0.6]], [[-0.7, -1.2, -0.4, -0.9], [-1.5]]]
    for beta in (0.1, 1.0, 5.0):
        assert LNDPO(beta=beta).loss(make_context(reference, reference)).loss.item() == pytest.approx(
            math.log(2), abs=1e-12
        )


def test_duplicating_tokens_leaves_the_loss_unchanged():
    doubled = [[seq + seq for seq in side] for side in POLICY]
    doubled_ref = [[seq + seq for seq in side] for side in ZEROS]
    assert LNDPO().loss(make_context(doubled, doubled_ref)).loss.item() == pytest.approx(
        LNDPO().loss(make_context(POLICY, ZEROS)).loss.item(), abs=1e-12
    )


@pytest.mark.parametrize("n, beta", [(1, 0.1), (4, 1.0), (7, 2.5)])
def test_equal_lengths_n_is_core_dpo_with_beta_over_n(n, beta):
    torch.manual_seed(n)
    policy = (-torch.rand(2, 3, n, dtype=torch.float64)).tolist()
    reference = (-torch.rand(2, 3, n, dtype=torch.float64)).tolist()
    ln = LNDPO(beta=beta).loss(make_context(policy, reference)).loss.item()
    dpo = DPO(beta=beta / n).loss(make_context(policy, reference)).loss.item()
    assert abs(ln - math.log(2)) > 1e-4
    assert ln == pytest.approx(dpo, abs=1e-6)


def test_label_smoothing_and_hinge_on_the_normalised_margin():
    ctx = make_context(POLICY, ZEROS)
    z = [0.1 + 1 / 12, -0.125]
    eps, beta = 0.1, 2.0

    def nls(x):  # −log σ(x)
        return math.log1p(math.exp(-x))

    smoothed = sum((1 - eps) * nls(beta * v) + eps * nls(-beta * v) for v in z) / 2
    assert LNDPO(beta=beta, label_smoothing=eps).loss(ctx).loss.item() == pytest.approx(smoothed, abs=1e-12)
    hinge = sum(max(0.0, 1 - beta * v) for v in z) / 2
    assert LNDPO(beta=beta, loss_type="hinge").loss(make_context(POLICY, ZEROS)).loss.item() == pytest.approx(
        hinge, abs=1e-12
    )


def test_gradient_signs_and_magnitude():
    beta = 1.0
    ctx = make_context(POLICY, ZEROS)
    LNDPO(beta=beta).loss(ctx).loss.backward()
    g = ctx.token_logps.grad
    for i, z in enumerate([0.1 + 1 / 12, -0.125]):
        # ∂L/∂ℓθ(y_w) = −(β/|y_w|) σ(−z) / B; ∂L/∂ℓθ(y_l) = +(β/|y_l|) σ(−z) / B; per token the same (ℓ is a sum)
        s = 1 / (1 + math.exp(z))
        n_w, n_l = LEN["w"][i], LEN["l"][i]
        assert g[0, i, :n_w].tolist() == pytest.approx([-beta / n_w * s / 2] * n_w, rel=1e-12)
        assert g[1, i, :n_l].tolist() == pytest.approx([beta / n_l * s / 2] * n_l, rel=1e-12)
    assert (g[0][ctx.mask[0] > 0] < 0).all() and (g[1][ctx.mask[1] > 0] > 0).all()
    assert (g[ctx.mask == 0] == 0).all()
    # the same normalised margin (z = 0.5) with a 4x shorter chosen response: a 4x larger per-token push
    grads = []
    for n in (2, 8):
        pair = make_context([[[-1.0] * n], [[-1.0] * 4]], [[[-1.5] * n], [[-1.0] * 4]])
        LNDPO().loss(pair).loss.backward()
        grads.append(pair.token_logps.grad[0, 0, 0].item())
    assert grads[0] == pytest.approx(4 * grads[1], rel=1e-12) and grads[0] < 0


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_matches_trl_sigmoid_norm_on_the_same_batch(tiny_model_dir, tmp_path, beta):
    from datasets import Dataset

    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(preference_rows(8))
    common = dict(output_dir=str(tmp_path), report_to="none", bf16=False, gradient_checkpointing=False,
                  dataloader_pin_memory=False, beta=beta)  # fmt: skip
    trl_norm = DPOTrainer(tiny_model_dir, args=DPOConfig(loss_type=["sigmoid_norm"], **common), train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    plus = PlusTrainer(tiny_model_dir, args=DPOConfig(**common), method="ln-dpo", method_args={"beta": beta},
                       train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    core_dpo = PlusTrainer(tiny_model_dir, args=DPOConfig(**common), method="dpo", method_args={"beta": beta},
                           train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    trainers = {"trl": trl_norm, "plus": plus, "dpo": core_dpo}
    for trainer in trainers.values():
        perturb(trainer.model)  # the same noise for every copy: the policy leaves the reference (loss ≠ log 2)
        trainer.model.eval()
    batches = [t.data_collator([t.train_dataset[i] for i in range(8)]) for t in (trl_norm, plus)]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batches[0][key], batches[1][key])  # both tokenize and collate the pairs identically
    batch = batches[0]
    lengths = batch["completion_mask"].sum(1).view(2, -1)
    assert (lengths[0] != lengths[1]).any()  # the normalisation matters on this batch
    with torch.no_grad():
        loss = {name: t.compute_loss(t.model, batch).item() for name, t in trainers.items()}
    assert abs(loss["trl"] - math.log(2)) > 1e-3
    assert loss["plus"] == pytest.approx(loss["trl"], abs=1e-6)
    assert abs(loss["plus"] - loss["dpo"]) > 1e-3  # and it is not plain DPO
    # the logged sequence log-probs agree with TRL's too
    ours, theirs = plus._metrics["eval"], trl_norm._metrics["eval"]
    for name in ("logps/chosen", "logps/rejected"):
        assert ours[name][-1] == pytest.approx(theirs[name][-1], abs=1e-4), name


def test_a_few_steps_raise_the_margin(tmp_path):
    logs = [e for e in train_tiny("ln-dpo", tmp_path, max_steps=8).state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError):
        LNDPO(beta=0)
    with pytest.raises(ValidationError):
        LNDPO(loss_type="ipo")  # IPO is already length-normalised in TRL's form: use `dpo` with loss_type ipo
    with pytest.raises(ValidationError):
        LNDPO(bta=1.0)


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/ln-dpo.yaml").read_text())
    assert recipe["method"] == "ln-dpo" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/ln-dpo.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
