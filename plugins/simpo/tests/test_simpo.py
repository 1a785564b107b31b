"""SimPO: the card's worked example and special cases, gradients, TRL's CPO `simpo` loss, no reference ever."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import TrainerCallback
from trl_plus_simpo import SimPO

from trl_plus import PlusTrainer, method_collator
from trl_plus.testing import (
    build_model,
    build_tokenizer,
    make_context,
    perturb,
    preference_rows,
    run_recipe_on_cpu,
    train_tiny,
)

ROOT = Path(__file__).resolve().parents[3]


def spread(total, n):
    """``n`` equal per-token log-probs summing to ``total``."""
    return [total / n] * n


def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


# Card worked example: pair 1 ℓ(y_w) = −12 over 10 tokens, ℓ(y_l) = −15 over 12; pair 2 −20 over 16, −18 over 8.
CARD = [[spread(-12, 10), spread(-20, 16)], [spread(-15, 12), spread(-18, 8)]]
CARD_REWARDS = [(-1.2, -1.25), (-1.25, -2.25)]  # (r̄_w, r̄_l) per pair


def test_card_worked_example():
    out = SimPO(beta=2.0, gamma_beta_ratio=0.5).loss(make_context(CARD))
    assert out.loss.item() == pytest.approx(0.777208, abs=1e-6)
    for i, expected in enumerate([1.24115, 0.313262]):
        pair = make_context([[s[i]] for s in CARD])
        assert SimPO(beta=2.0, gamma_beta_ratio=0.5).loss(pair).loss.item() == pytest.approx(expected, abs=1e-5)
    # logged rewards are β·r̄
    assert torch.allclose(out.rewards, 2.0 * torch.tensor(CARD_REWARDS, dtype=torch.float64).T, atol=1e-12)
    # sft_weight 0.5 adds 0.5 × the token-mean chosen NLL (32 / 26)
    with_sft = SimPO(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.5).loss(make_context(CARD))
    assert with_sft.loss.item() == pytest.approx(1.39259, abs=1e-5)
    assert with_sft.metrics["simpo/sft_loss"].item() == pytest.approx(32 / 26, abs=1e-12)


def test_label_smoothing_and_hinge_on_the_card_pairs():
    beta, gamma, eps = 2.0, 1.0, 0.1
    x = [beta * (w - l) - gamma for w, l in CARD_REWARDS]  # β·logits of the official trainer: [−0.9, 1.0]
    smoothed = sum((1 - eps) * neg_log_sigmoid(v) + eps * neg_log_sigmoid(-v) for v in x) / 2
    hinge = sum(max(0.0, 1 - v) for v in x) / 2  # [1.9, 0] → 0.95
    got = SimPO(beta=beta, gamma=gamma, label_smoothing=eps).loss(make_context(CARD)).loss.item()
    assert got == pytest.approx(smoothed, abs=1e-12)
    assert SimPO(beta=beta, gamma=gamma, loss_type="hinge").loss(make_context(CARD)).loss.item() == pytest.approx(
        hinge, abs=1e-12
    )
    assert hinge == pytest.approx(0.95, abs=1e-12)


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
    assert all(a < b for a, b in zip(losses, losses[1:]))


def test_gradient_signs_and_magnitude():
    beta, gamma = 2.0, 1.0
    ctx = make_context(CARD)
    SimPO(beta=beta, gamma=gamma).loss(ctx).loss.backward()
    grad = ctx.token_logps.grad
    for i, ((r_w, r_l), n_w, n_l) in enumerate(zip(CARD_REWARDS, [10, 16], [12, 8])):
        # ∂L/∂r̄_w = −β σ(−(βΔr̄ − γ)) = −∂L/∂r̄_l, over the batch mean (B = 2); r̄ = sum / n
        dl_dr = -beta / (1 + math.exp(beta * (r_w - r_l) - gamma)) / 2
        assert grad[0, i, :n_w] == pytest.approx(torch.full((n_w,), dl_dr / n_w, dtype=torch.float64), rel=1e-9)
        assert grad[1, i, :n_l] == pytest.approx(torch.full((n_l,), -dl_dr / n_l, dtype=torch.float64), rel=1e-9)
    assert (grad[0][ctx.mask[0] > 0] < 0).all() and (grad[1][ctx.mask[1] > 0] > 0).all()
    assert (grad[ctx.mask == 0] == 0).all()


def test_config_validation():
    with pytest.raises(ValidationError, match="not both"):
        SimPO(gamma=1.0, gamma_beta_ratio=0.5)
    with pytest.raises(ValidationError):
        SimPO(gama=1.0)  # a typo is an error, not a silently ignored key
    with pytest.raises(ValidationError):
        SimPO(loss_type="ipo")
    assert SimPO().config.margin_ratio == 0.25 and SimPO(beta=2.0, gamma=1.6).config.margin_ratio == 0.8


@pytest.mark.parametrize("sft_weight, label_smoothing", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.1)])
def test_matches_trl_cpo_simpo_on_a_real_batch(tmp_path, monkeypatch, sft_weight, label_smoothing):
    """TRL's own ``CPOTrainer(loss_type="simpo", cpo_alpha=w)`` on the same token ids: cpo_alpha is SimPO's
    sft_weight (both a token-mean cross-entropy over the chosen responses of the batch)."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl import DPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, gamma, batch_size = 2.0, 1.0, 8
    tokenizer = build_tokenizer()
    dataset = Dataset.from_list(preference_rows(batch_size))
    common = dict(report_to="none", bf16=False, dataloader_pin_memory=False)
    cpo = CPOTrainer(build_model(tokenizer), train_dataset=dataset, processing_class=tokenizer, args=CPOConfig(
        output_dir=str(tmp_path / "cpo"), loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=sft_weight,
        label_smoothing=label_smoothing, **common))  # fmt: skip
    method_args = {"beta": beta, "gamma": gamma, "sft_weight": sft_weight, "label_smoothing": label_smoothing}
    plus_args = DPOConfig(output_dir=str(tmp_path / "plus"), gradient_checkpointing=False, **common)
    plus = PlusTrainer(build_model(tokenizer), args=plus_args, method="simpo", method_args=method_args,
                       train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    for trainer in (cpo, plus):
        perturb(trainer.model)  # the same noise for both: away from the seeded initialisation
        trainer.model.eval()
    batch = plus.data_collator([plus.train_dataset[i] for i in range(batch_size)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    cpo_batch = {}  # the very same sequences in CPO's batch format
    for name, rows in (("chosen", slice(0, batch_size)), ("rejected", slice(batch_size, None))):
        cpo_batch[f"{name}_input_ids"] = batch["input_ids"][rows]
        cpo_batch[f"{name}_attention_mask"] = batch["attention_mask"][rows]
        cpo_batch[f"{name}_labels"] = labels[rows]
    with torch.no_grad():
        expected, trl_metrics = cpo.get_batch_loss_metrics(cpo.model, cpo_batch, train_eval="train")
        got = plus.compute_loss(plus.model, batch)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    ours = {name: values[-1] for name, values in plus._metrics["eval"].items()}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    if sft_weight:
        # CPO: cross-entropy over the full float32 logits; trl-plus: the fused head's per-token log-probs, then the
        # mean over the n chosen tokens. Each is exact to about eps32·log2(n)·NLL: 2× that (~8e-6 here; seen:
        # 4.8e-7, one float32 ulp of the NLL)
        n = int(batch["completion_mask"][:batch_size].sum())
        tol = 2 * torch.finfo(torch.float32).eps * math.log2(n) * trl_metrics["nll_loss"]
        assert ours["simpo/sft_loss"] == pytest.approx(trl_metrics["nll_loss"], abs=tol)


class _CountForwards(TrainerCallback):
    """Counts forward calls of the policy model over the whole training run."""

    def __init__(self):
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(self._count)

    def _count(self, *args):
        self.calls += 1


def test_no_reference_ever_and_the_margin_grows(tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free method asked for reference log-probs")

    monkeypatch.setattr(PlusTrainer, "reference_token_logps", no_reference)
    monkeypatch.setattr(PlusTrainer, "frozen_token_logps", no_reference)
    counter, steps = _CountForwards(), 8
    trainer = train_tiny("simpo", tmp_path, method_args={"beta": 2.0, "gamma_beta_ratio": 0.5}, max_steps=steps,
                         callbacks=[counter])  # fmt: skip
    assert trainer.ref_model is None and trainer.reference_mode == "none"
    assert counter.calls == steps  # exactly one (policy) forward per optimiser step
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == steps
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]
    assert logs[-1]["loss"] < logs[0]["loss"]



def official_truncation(prompt, chosen, rejected, max_length, max_prompt_length, mode="keep_end"):
    """scripts/simpo_trainer.py tokenize_row: cut the prompt first (keep_end: its last max_prompt_length tokens),
    then, if still too long, both responses to their first max_length − max_prompt_length tokens."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        prompt = prompt[-max_prompt_length:] if mode == "keep_end" else prompt[:max_prompt_length]
    if len(prompt) + longer > max_length:
        chosen, rejected = chosen[: max_length - max_prompt_length], rejected[: max_length - max_prompt_length]
    return (prompt, chosen), (prompt, rejected)


def test_truncation_official_keep_end_cuts_only_the_prompt_trl_plus_cuts_whole_sequences():
    """What the README says: the official keep_end truncates only the prompt (the same one for both responses);
    trl-plus's keep_start cuts the responses' ends (EOS included), its keep_end the prompt's start, per sequence."""
    eos = 2
    prompt, chosen, rejected = list(range(10, 30)), [5] * 7 + [eos], [6] * 4 + [eos]  # 20 + 8 / 20 + 5 tokens
    max_length, max_prompt_length = 24, 12
    for (p, response), full in zip(official_truncation(prompt, chosen, rejected, max_length, max_prompt_length),
                                   (chosen, rejected)):  # fmt: skip
        assert p == prompt[-12:] and response == full  # the prompt's end, the same for both; responses whole

    example = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
    keep_start = method_collator(SimPO(), 0, max_length, "keep_start")([example])
    for row, full in enumerate((chosen, rejected)):
        kept = keep_start["input_ids"][row][keep_start["completion_mask"][row].bool()].tolist()
        assert keep_start["input_ids"][row, :20].tolist() == prompt and kept == full[: max_length - 20]
        assert eos not in kept  # the response's end is gone, its EOS with it
    keep_end = method_collator(SimPO(), 0, max_length, "keep_end")([example])
    for row, full in enumerate((chosen, rejected)):
        n_prompt = max_length - len(full)  # 16 for y_w, 19 for y_l: different contexts
        assert keep_end["input_ids"][row, :max_length].tolist() == prompt[-n_prompt:] + full
        assert keep_end["completion_mask"][row].sum().item() == len(full)


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/simpo.yaml").read_text())
    assert recipe["method"] == "simpo" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/simpo.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())
    assert resolved["method_args"]["beta"] == recipe["method_args"]["beta"]
    assert resolved["method_args"]["gamma_beta_ratio"] == recipe["method_args"]["gamma_beta_ratio"]
