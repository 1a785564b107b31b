"""LD-DPO: the card's worked example and special cases, gradients, TRL's ld_alpha, real steps, the recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from trl import DPOConfig, DPOTrainer
from trl_plus_ld_dpo import LDDPO, desensitized_logps

from trl_plus import DPO, PlusTrainer
from trl_plus.testing import build_tokenizer, make_context, perturb, preference_rows, run_recipe_on_cpu, train_tiny

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
    [
        (0.5, [0.683197, 0.685675], 0.684436),
        (1.0, [0.678260, 0.688160], 0.683210),
        (0.0, [0.688160, 0.683197], 0.685678),
    ],
)
def test_card_worked_example(alpha, per_pair, mean):
    batch_loss = LDDPO(beta=0.1, alpha=alpha).loss(make_context(POLICY, REFERENCE)).loss.item()
    assert batch_loss == pytest.approx(mean, abs=1e-6)
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
        at_init = LDDPO(alpha=alpha).loss(make_context(POLICY, POLICY)).loss.item()
        assert at_init == pytest.approx(math.log(2), abs=1e-12)


def reference_delta_hat(i, alpha):
    """Δ̂ of card pair ``i`` computed by hand from Eq. 11 (independent of the plugin)."""
    shared = min(len(POLICY[0][i]), len(POLICY[1][i]))

    def hat(tokens):
        return sum(tokens[:shared]) + alpha * sum(tokens[shared:])

    return (hat(POLICY[0][i]) - hat(REFERENCE[0][i])) - (hat(POLICY[1][i]) - hat(REFERENCE[1][i]))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_gradients_shared_tokens_get_dpos_and_tail_tokens_alpha_times_it(alpha):
    beta = 0.1
    ctx = make_context(POLICY, REFERENCE)
    LDDPO(beta=beta, alpha=alpha).loss(ctx).loss.backward()
    g = ctx.token_logps.grad
    for i in range(2):
        # ∂L/∂Δ̂ = −β σ(−βΔ̂), mean over B = 2 pairs; a shared token has weight 1 in ℓ̂, a tail token α
        d = -beta / (1 + math.exp(beta * reference_delta_hat(i, alpha))) / 2
        shared = min(len(POLICY[0][i]), len(POLICY[1][i]))
        for k, sign in ((0, 1), (1, -1)):
            n = len(POLICY[k][i])
            expected = [sign * d] * shared + [sign * d * alpha] * (n - shared)
            assert g[k, i, :n].tolist() == pytest.approx(expected, abs=1e-15, rel=1e-12)
    # pair 1: the rejected response is the longer (5 vs 3); pair 2: the chosen one (4 vs 2)
    assert (g[0, 0, :3] < 0).all() and (g[1, 1, :2] > 0).all()
    if alpha > 0:
        assert (g[0][ctx.mask[0] > 0] < 0).all() and (g[1][ctx.mask[1] > 0] > 0).all()
    else:  # α = 0: the tail is ignored entirely
        assert (g[1, 0, 3:5] == 0).all() and (g[0, 1, 2:4] == 0).all()
    assert (g[ctx.mask == 0] == 0).all()


def test_matches_trl_ld_alpha_on_the_same_batch(tiny_model_dir, tmp_path):
    from datasets import Dataset

    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(preference_rows(8))
    common = dict(output_dir=str(tmp_path), report_to="none", bf16=False, gradient_checkpointing=False,
                  dataloader_pin_memory=False)  # fmt: skip

    def trl_trainer(ld_alpha):
        return DPOTrainer(tiny_model_dir, args=DPOConfig(ld_alpha=ld_alpha, **common), train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip

    def plus_trainer(alpha):
        return PlusTrainer(tiny_model_dir, args=DPOConfig(**common), method="ld-dpo", method_args={"alpha": alpha},
                           train_dataset=dataset, processing_class=tokenizer)  # fmt: skip

    core_dpo = PlusTrainer(tiny_model_dir, args=DPOConfig(**common), method="dpo", train_dataset=dataset,
                           processing_class=tokenizer)  # fmt: skip
    trainers = {"trl-0.3": trl_trainer(0.3), "plus-0.3": plus_trainer(0.3), "trl-1.0": trl_trainer(1.0),
                "trl-none": trl_trainer(None), "plus-1.0": plus_trainer(1.0), "dpo": core_dpo}  # fmt: skip
    for trainer in trainers.values():
        perturb(trainer.model)  # the same noise for every copy: the policy leaves the reference (loss ≠ log 2)
        trainer.model.eval()
    pair = (trainers["trl-0.3"], trainers["plus-0.3"])
    batches = [t.data_collator([t.train_dataset[i] for i in range(8)]) for t in pair]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batches[0][key], batches[1][key])  # both tokenize and collate the pairs identically
    batch = batches[0]
    lengths = batch["completion_mask"].sum(1).view(2, -1)
    assert (lengths[0] > lengths[1]).any() and (lengths[0] < lengths[1]).any()  # tails on both sides
    with torch.no_grad():
        loss = {name: t.compute_loss(t.model, batch).item() for name, t in trainers.items()}
    assert abs(loss["trl-0.3"] - math.log(2)) > 1e-3
    # TRL sums each response's float32 log-probs in two parts (up to the shorter length, then the rest), trl-plus
    # in one: each sum is exact to about eps32·log2(L)·|sum|, so the loss (|∂L/∂z| ≤ 1, z = β·[(ℓθ − ℓref)(y_w) −
    # (ℓθ − ℓref)(y_l)]) to 2β·eps32·log2(L)·(|ℓ(y_w)| + |ℓ(y_l)|), batch means (~2.5e-5 here; seen: up to 1.2e-7)
    logps = trainers["dpo"]._metrics["eval"]
    scale = abs(logps["logps/chosen"][-1]) + abs(logps["logps/rejected"][-1])
    tol = 2 * 0.1 * torch.finfo(torch.float32).eps * math.log2(batch["input_ids"].shape[1]) * scale  # β = 0.1
    assert loss["plus-0.3"] == pytest.approx(loss["trl-0.3"], abs=tol)
    assert loss["plus-1.0"] == pytest.approx(loss["trl-1.0"], abs=tol)
    assert loss["trl-1.0"] == pytest.approx(loss["trl-none"], abs=tol)  # TRL: ld_alpha 1 is plain DPO
    assert loss["plus-1.0"] == pytest.approx(loss["dpo"], abs=tol)
    assert abs(loss["plus-0.3"] - loss["dpo"]) > 100 * tol  # and α < 1 is not


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
    recipe = yaml.safe_load((ROOT / "recipes/ld-dpo.yaml").read_text())
    assert recipe["method"] == "ld-dpo" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/ld-dpo.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
