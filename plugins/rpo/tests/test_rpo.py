"""RPO: the card's worked example for all three normalisations, η = 0 is DPO, gradients, TRL's sft loss."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from trl import DPOConfig, DPOTrainer
from trl_plus_rpo import RPO

from trl_plus import DPO, PlusTrainer
from trl_plus.testing import build_tokenizer, make_context, perturb, preference_rows, run_recipe_on_cpu, train_tiny

ROOT = Path(__file__).resolve().parents[3]


def tokens(total, n):
    """``n`` equal per-token log-probs summing to ``total``."""
    return [total / n] * n


# The DPO card's two pairs (sums ℓθ(y_w) = −12, −20; ℓθ(y_l) = −15, −18; ℓref(y_w) = −13, −19; ℓref(y_l) = −14,
# −18.5), with the RPO card's chosen lengths 10 and 16 (rejected lengths 12 and 8), spread evenly over tokens.
POLICY = [[tokens(-12, 10), tokens(-20, 16)], [tokens(-15, 12), tokens(-18, 8)]]
REFERENCE = [[tokens(-13, 10), tokens(-19, 16)], [tokens(-14, 12), tokens(-18.5, 8)]]


def card_context():
    """Both pairs of the card."""
    return make_context(POLICY, REFERENCE)


def card_pair(i):
    """Pair ``i`` of the card alone."""
    return make_context([[side[i]] for side in POLICY], [[side[i]] for side in REFERENCE])


@pytest.mark.parametrize(
    "normalization, expected", [("sum", 1.00455), ("sequence_mean", 0.929548), ("token_mean", 0.930702)]
)
def test_card_worked_example(normalization, expected):
    out = RPO(beta=0.1, eta=0.2, sft_normalization=normalization).loss(card_context())
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert out.metrics["rpo/dpo_loss"].item() == pytest.approx(0.684548, abs=1e-6)
    for i, expected_dpo in enumerate([0.598139, 0.770957]):  # the card's per-pair DPO losses
        out = RPO(beta=0.1, eta=0.2, sft_normalization=normalization).loss(card_pair(i))
        assert out.metrics["rpo/dpo_loss"].item() == pytest.approx(expected_dpo, abs=1e-6)


@pytest.mark.parametrize("normalization", ["sum", "sequence_mean", "token_mean"])
def test_eta_zero_is_dpo(normalization):
    got = RPO(beta=0.1, eta=0.0, sft_normalization=normalization).loss(card_context()).loss.item()
    assert got == pytest.approx(DPO(beta=0.1).loss(card_context()).loss.item(), abs=1e-12)


# The DPO card's gradients of the batch loss w.r.t. ℓθ(y_w) (w.r.t. ℓθ(y_l): the negatives), β = 0.1.
DPO_CARD_CHOSEN_GRAD = [-0.0225083, -0.0268715]


@pytest.mark.parametrize(
    "normalization, extra",
    [("sum", lambda beta, eta, n: eta * beta / 2), ("sequence_mean", lambda beta, eta, n: eta / (2 * n))],
)
def test_chosen_gradient_is_dpo_plus_the_sft_weight(normalization, extra):
    beta, eta = 0.1, 0.2
    rpo_ctx, dpo_ctx = card_context(), card_context()
    RPO(beta=beta, eta=eta, sft_normalization=normalization).loss(rpo_ctx).loss.backward()
    DPO(beta=beta).loss(dpo_ctx).loss.backward()
    rpo_g, dpo_g = rpo_ctx.token_logps.grad, dpo_ctx.token_logps.grad
    for i, (n_w, n_l) in enumerate([(10, 12), (16, 8)]):
        # every token of a sequence has the sequence's gradient: ∂ℓ/∂a_t = 1, ∂(ℓ/|y|)/∂a_t = 1/|y|
        # chosen: DPO's (card) more negative by η·β/B (sum) or η/(B·|y_w|) (sequence_mean)
        expected_w = DPO_CARD_CHOSEN_GRAD[i] - extra(beta, eta, n_w)
        assert rpo_g[0, i, :n_w] == pytest.approx(torch.full((n_w,), expected_w, dtype=torch.float64), abs=1e-7)
        assert (rpo_g[0, i, :n_w] - dpo_g[0, i, :n_w]) == pytest.approx(
            torch.full((n_w,), -extra(beta, eta, n_w), dtype=torch.float64), abs=1e-12
        )
        # rejected: DPO's, unchanged
        expected_l = -DPO_CARD_CHOSEN_GRAD[i]
        assert rpo_g[1, i, :n_l] == pytest.approx(torch.full((n_l,), expected_l, dtype=torch.float64), abs=1e-7)
    assert torch.equal(rpo_g[1], dpo_g[1])
    assert (rpo_g[0][rpo_ctx.mask[0] > 0] < 0).all() and (rpo_g[1][rpo_ctx.mask[1] > 0] > 0).all()


def test_sum_form_scales_with_length_and_mean_forms_do_not():
    short = make_context([[[-1.0, -1.0]], [[-1.0]]], [[[-1.0, -1.0]], [[-1.0]]])
    long = make_context([[[-1.0] * 4], [[-1.0]]], [[[-1.0] * 4], [[-1.0]]])
    sft = {n: [RPO(eta=1.0, sft_normalization=n).loss(c).metrics["rpo/sft_loss"].item() for c in (short, long)]
           for n in ("sum", "sequence_mean", "token_mean")}  # fmt: skip
    assert sft["sum"][1] == pytest.approx(2 * sft["sum"][0])
    assert sft["sequence_mean"][0] == pytest.approx(sft["sequence_mean"][1])
    assert sft["token_mean"][0] == pytest.approx(sft["token_mean"][1])


def test_at_init_the_dpo_part_is_log2_and_the_sft_part_is_the_weighted_nll():
    same = [[[-1.0] * 10, [-2.0] * 16], [[-1.0] * 12, [-2.0] * 8]]  # ℓθ(y_w) = −10 and −32
    beta, eta = 0.1, 0.2
    expected_sft = {
        "sum": eta * beta * (10 + 32) / 2,  # η·β·mean(−ℓθ(y_w))
        "sequence_mean": eta * (1.0 + 2.0) / 2,  # η·mean(−ℓθ(y_w)/|y_w|)
        "token_mean": eta * (10 + 32) / (10 + 16),  # η·Σ(−ℓθ(y_w))/Σ|y_w|
    }
    for normalization, sft in expected_sft.items():
        out = RPO(beta=beta, eta=eta, sft_normalization=normalization).loss(make_context(same, same))
        assert out.metrics["rpo/dpo_loss"].item() == pytest.approx(math.log(2), abs=1e-12)
        assert out.metrics["rpo/sft_loss"].item() == pytest.approx(sft, abs=1e-12)
        assert out.loss.item() == pytest.approx(math.log(2) + sft, abs=1e-12)


def equal_length_chosen_rows(n=8, seed=0):
    """Pairs whose chosen responses all have the same number of characters (tokens of the char tokenizer)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 49), rng.randint(1, 49)
        rejected = rng.choice(["I do not know.", "No.", "Numbers are boring, ask me something else."])
        chosen = f"{a:02d} + {b:02d} = {a + b:03d}."  # always 15 characters
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": chosen, "rejected": rejected})
    return rows


def trl_and_plus_losses(model_dir, output_dir, rows, beta, eta, normalizations):
    """TRL's DPOTrainer(loss_type=["sigmoid", "sft"], loss_weights=[1, η]) and PlusTrainer(rpo) for each
    normalization, all on the same perturbed weights and the same collated batch."""
    from datasets import Dataset

    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(rows)
    common = dict(output_dir=str(output_dir), report_to="none", bf16=False, gradient_checkpointing=False,
                  dataloader_pin_memory=False)  # fmt: skip
    trl_args = DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, eta], beta=beta, **common)
    trl = DPOTrainer(model_dir, args=trl_args, train_dataset=dataset, processing_class=tokenizer)
    trainers = [trl] + [
        PlusTrainer(model_dir, args=DPOConfig(**common), method="rpo", train_dataset=dataset,
                    processing_class=tokenizer, method_args={"beta": beta, "eta": eta, "sft_normalization": n})
        for n in normalizations
    ]  # fmt: skip
    for trainer in trainers:
        perturb(trainer.model)  # the same noise for all: the loss leaves its value at initialisation
        trainer.model.eval()
    batch = trl.data_collator([trl.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        losses = [trainer.compute_loss(trainer.model, batch).item() for trainer in trainers]
    dpo_part = trainers[1]._metrics["eval"]["rpo/dpo_loss"][-1]
    assert abs(dpo_part - math.log(2)) > 1e-3  # the perturbation moved the DPO part away from its initial log 2
    return batch, losses[0], dict(zip(normalizations, losses[1:]))


def test_equal_chosen_lengths_sequence_and_token_mean_match_trl_sigmoid_plus_sft(tiny_model_dir, tmp_path):
    eta, beta = 0.3, 0.1
    batch, trl, plus = trl_and_plus_losses(tiny_model_dir, tmp_path, equal_length_chosen_rows(), beta, eta,
                                           ["token_mean", "sequence_mean", "sum"])  # fmt: skip
    chosen_lengths = batch["completion_mask"].sum(1).view(2, -1)[0]
    assert (chosen_lengths == chosen_lengths[0]).all()  # the premise: every chosen response has the same length
    assert plus["token_mean"] == pytest.approx(trl, abs=1e-6)  # TRL's own reduction: bit-identical here
    # mean of per-response means vs TRL's mean over all chosen tokens: equal in exact arithmetic for equal lengths;
    # a float32 mean of n terms is exact to about eps32·log2(n)·(its value), and η·NLL ≤ the loss, so 2× that
    # relative to the loss (~3e-6 here; seen: 2.4e-7)
    n = int(batch["completion_mask"].sum(1).view(2, -1)[0].sum())
    tol = 2 * torch.finfo(torch.float32).eps * math.log2(n) * abs(trl)
    assert plus["sequence_mean"] == pytest.approx(trl, abs=tol)
    assert abs(plus["sum"] - trl) > 1e-3  # the cumulative form never equals TRL's


def test_token_mean_matches_trl_on_ragged_chosen_lengths(tiny_model_dir, tmp_path):
    eta, beta = 0.3, 0.1
    batch, trl, plus = trl_and_plus_losses(tiny_model_dir, tmp_path, preference_rows(8), beta, eta,
                                           ["token_mean", "sequence_mean"])  # fmt: skip
    chosen_lengths = batch["completion_mask"].sum(1).view(2, -1)[0]
    assert (chosen_lengths != chosen_lengths[0]).any()
    assert plus["token_mean"] == pytest.approx(trl, abs=1e-6)
    assert abs(plus["sequence_mean"] - trl) > 1e-4  # per-response mean differs once lengths differ


def test_a_few_steps_raise_the_margin(tmp_path):
    trainer = train_tiny("rpo", tmp_path, method_args={"beta": 0.1, "eta": 0.2}, max_steps=8)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]
    assert logs[-1]["rpo/sft_loss"] < logs[0]["rpo/sft_loss"]  # the chosen responses became more likely


def test_config_rejects_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RPO(sft_normalization="mean")
    with pytest.raises(ValidationError):
        RPO(eta=-0.1)
    with pytest.raises(ValidationError):
        RPO(etta=0.2)  # a typo is an error, not a silently ignored key


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/rpo.yaml").read_text())
    assert recipe["method"] == "rpo" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/rpo.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
