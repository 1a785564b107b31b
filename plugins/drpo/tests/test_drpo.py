"""DRPO: the card's worked example (positive weights, J, ∂(−J)/∂s), the official code's value and gradient, λ → ∞ and
equal lengths = DisCO exactly (DisCO's card numbers and closed form), the weights' invariances, negatives untouched,
invalid groups counting in Q, the coefficients through advantages() and loss(), the KL penalty (DisCO's card
numbers, off on the first optimiser step after a generation), a binary verifier's pass rate rising, and the recipe
validating."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_drpo import DRPO, DRPOConfig, coefficients, drpo_objective, kl_estimate, kl_penalty, length_weights

from trl_plus import GroupContext, Rollouts, get_registry
from trl_plus.testing import tiny_group_trainer

ROOT = Path(__file__).resolve().parents[3]
F64 = torch.float64

# The card: one question, λ = 0.1, τ = 10, L_max = 8192.
REWARDS = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=F64)
LENGTHS = torch.tensor([[4000.0, 3000.0, 5000.0, 8192.0]], dtype=F64)
SCORES = torch.tensor([[-0.30, -0.90, -0.50, -1.20]], dtype=F64)
POSITIVE = REWARDS > 0.5


def minus_J_and_grad(weights: torch.Tensor, scores: torch.Tensor = SCORES, rewards: torch.Tensor = REWARDS):
    scores = scores.clone().requires_grad_(True)
    J = drpo_objective(scores, rewards, weights, tau=10.0)
    (-J).backward()
    return J.item(), scores.grad


def test_card_worked_example():
    rho = 1 - LENGTHS / 8192
    raw = torch.exp(rho / 0.1)[POSITIVE]
    assert raw.tolist() == pytest.approx([166.865, 49.2291], abs=1e-3)  # the card's w (5 significant digits)
    weights = length_weights(LENGTHS, POSITIVE, 0.1, 8192)
    assert weights[0].tolist() == pytest.approx([0.772187, 0.0, 0.227813, 0.0], abs=1e-6)
    assert torch.allclose(weights[POSITIVE], raw / raw.sum(), atol=1e-15, rtol=0)
    J, grad = minus_J_and_grad(weights)
    assert J == pytest.approx(0.703313, abs=1e-6)
    assert grad[0].tolist() == pytest.approx([-0.772187, 0.507499, -0.227813, 0.492500], abs=1e-6)
    c = coefficients(SCORES, REWARDS, weights, tau=10.0)  # the closed form: ∂(−J)/∂s = −c/Q
    assert torch.allclose(-c, grad, atol=1e-12, rtol=0)
    assert (grad[0][[0, 2]] < 0).all() and (grad[0][[1, 3]] > 0).all()  # positives pushed up, negatives down
    assert grad[0][0] < grad[0][2]  # the shorter positive gets more of the push


def official_value(scores: torch.Tensor, tau: float = 10.0, Lambda: float = 0.1) -> torch.Tensor:
    """compute_policy_loss_drpo's J (Optimization-AI/DRPO, core_algos.py) line by line, without the KL, on the card's
    question; the length ratio is mask.sum / mask width, the width being L_max (verl pads to max_response_length)."""
    rewards, lengths = REWARDS.to(scores.dtype), LENGTHS.to(scores.dtype)
    pos, neg = rewards == 1, rewards == 0
    length_ratio = lengths / 8192
    neg_max = (scores / tau).masked_fill(~neg, float("-inf")).max(-1, keepdim=True).values
    neg_exp = torch.exp(((scores / tau) - neg_max.detach()) * neg) * neg
    neg_sum_exp = neg_exp.sum(-1, keepdim=True)
    neg_logmeanexp = neg_sum_exp / (neg_sum_exp.detach() + torch.finfo(neg_sum_exp.dtype).eps)
    weight = torch.exp((1 - length_ratio) / Lambda)
    per_question = (weight * (scores - tau * neg_logmeanexp) * pos).sum(1, keepdim=True) / (weight * pos).sum(
        1, keepdim=True)  # fmt: skip
    return per_question.sum() / rewards.size(0)


def test_the_official_codes_value_differs_by_a_constant_and_its_gradient_is_ours():
    # the card's −10.345561 is the float32 value (its eps in S/(sg(S) + eps) shows); float64: −10.3455625
    assert official_value(SCORES.float()).item() == pytest.approx(-10.345561, abs=1e-6)
    s = SCORES.clone().requires_grad_(True)
    value = official_value(s)
    assert value.item() == pytest.approx(-10.3455625, abs=1e-7)
    value.backward()
    _, ours = minus_J_and_grad(length_weights(LENGTHS, POSITIVE, 0.1, 8192))
    assert torch.allclose(-s.grad, ours, atol=1e-12, rtol=0)


# DisCO's card (plugin disco): Q = 2, question 1 as above, question 2 all correct; τ = 10.
DISCO_REWARDS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=F64)
DISCO_SCORES = torch.tensor([[-0.30, -0.90, -0.50, -1.20], [-0.4, -0.7, -0.2, -1.5]], dtype=F64)
DISCO_LENGTHS = torch.tensor([[4000.0, 3000.0, 5000.0, 8192.0], [10.0, 200.0, 3000.0, 7000.0]], dtype=F64)


def test_lambda_to_infinity_and_equal_lengths_are_disco_exactly():
    positive = DISCO_REWARDS > 0.5
    uniform = positive.to(F64) / positive.sum(-1, keepdim=True)  # DisCO's mean over positives
    infinite = length_weights(DISCO_LENGTHS, positive, math.inf, 8192)
    assert torch.equal(infinite, uniform)
    assert torch.allclose(length_weights(DISCO_LENGTHS, positive, 1e12, 8192), uniform, atol=1e-6, rtol=0)
    equal = length_weights(torch.full_like(DISCO_LENGTHS, 1234.0), positive, 0.1, 8192)
    assert torch.allclose(equal, uniform, atol=1e-15, rtol=0)
    J, grad = minus_J_and_grad(infinite, DISCO_SCORES, DISCO_REWARDS)
    assert J == pytest.approx(0.324438, abs=1e-6)  # DisCO's card, τ 10
    assert grad[0].tolist() == pytest.approx([-0.25, 0.253750, -0.25, 0.246250], abs=1e-6)
    assert grad[1].tolist() == [0.0] * 4  # the invalid question: 0, but it counts in Q = 2
    # the same through the method: λ = inf gives DisCO's n·c_o, as the disco plugin's advantages()
    method = DRPO(length_lambda=math.inf)
    advantages = method.advantages(card_rollouts(DISCO_SCORES, DISCO_REWARDS, DISCO_LENGTHS), torch.zeros(8))
    assert method.positive_reward(card_rollouts(DISCO_SCORES, DISCO_REWARDS, DISCO_LENGTHS)).max() < 1
    assert torch.allclose(advantages, -4 * 2 * grad.flatten(), atol=1e-12, rtol=0)


def test_weight_properties():
    positive = DISCO_REWARDS > 0.5
    w = length_weights(DISCO_LENGTHS, positive, 0.1, 8192)
    assert w.sum(-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)  # sums to 1 over each group's positives
    assert (w[~positive] == 0).all()
    assert (w[1].diff() < 0).all()  # shorter positive ⇒ larger weight
    rho = 1 - DISCO_LENGTHS / 8192
    assert torch.allclose(length_weights(None, positive, 0.1, 8192, reward=rho + 7.0), w, atol=1e-12, rtol=0)
    assert torch.allclose(length_weights(DISCO_LENGTHS / 2, positive, 0.1, 4096), w, atol=1e-12, rtol=0)  # L/L_max
    # the negatives' coefficients do not depend on the positives' weights (nor on λ)
    c_short = coefficients(DISCO_SCORES, DISCO_REWARDS, w)
    c_uniform = coefficients(DISCO_SCORES, DISCO_REWARDS, positive.to(F64) / positive.sum(-1, keepdim=True))
    negative = DISCO_REWARDS < 0.5
    assert torch.equal(c_short[negative], c_uniform[negative])
    assert coefficients(DISCO_SCORES[1:], DISCO_REWARDS[1:], w[1:]).abs().sum().item() == 0.0  # all correct


def card_rollouts(scores, rewards, lengths) -> Rollouts:
    """Rollouts of ``lengths`` tokens each whose old log-probs are all the row's score (so the token mean is it)."""
    n, width = scores.numel(), int(lengths.max())
    lengths = lengths.flatten().to(F64)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    old = torch.where(mask, scores.flatten()[:, None], torch.zeros(()))
    return Rollouts(prompt_ids=[[0]] * n, completion_ids=[[1] * int(length) for length in lengths], prompts=[""] * n,
                    completions=[""] * n, group=torch.arange(n) // scores.size(1), source=["policy"] * n,
                    scores=rewards.flatten()[:, None], weights=torch.ones(1, dtype=F64),
                    eos=torch.ones(n, dtype=torch.bool), lengths=lengths, old_token_logps=old)  # fmt: skip


def test_advantages_and_loss_give_the_cards_gradient():
    method = DRPO(max_length=8192)
    rollouts = card_rollouts(SCORES, REWARDS, LENGTHS)
    advantages = method.advantages(rollouts, torch.zeros(4))
    assert torch.allclose(advantages, 4 * coefficients(SCORES, REWARDS, length_weights(LENGTHS, POSITIVE, 0.1, 8192))
                          .flatten(), atol=1e-12, rtol=0)  # fmt: skip
    token_logps = rollouts.old_token_logps.clone().requires_grad_(True)
    mask = (torch.arange(8192)[None, :] < LENGTHS.flatten()[:, None]).to(F64)
    for rows in ([2, 0], [3, 1]):  # two micro-batches of a shuffled update
        ctx = GroupContext(token_logps=token_logps[rows], old_token_logps=rollouts.old_token_logps[rows],
                           mask=mask[rows], advantages=advantages[rows], config=method.config, rows_per_update=4,
                           step_in_generation=0)  # fmt: skip
        out = method.loss(ctx)
        out.loss.backward()
    per_sequence = token_logps.grad[:, 0] * LENGTHS.flatten()  # ∂/∂token = ∂/∂s / |o|
    assert per_sequence.tolist() == pytest.approx([-0.772187, 0.507499, -0.227813, 0.492500], abs=1e-6)
    assert (token_logps.grad * (1 - mask)).abs().sum().item() == 0.0
    assert out.metrics["drpo/objective"] == pytest.approx(0.703313, abs=1e-6)
    assert out.metrics["drpo/kl"].item() == 0.0 and out.metrics["drpo/penalty"].item() == 0.0
    assert out.metrics["drpo/positive_length"] == 4500.0
    assert out.metrics["drpo/weighted_positive_length"] == pytest.approx(0.772187 * 4000 + 0.227813 * 5000, abs=1e-2)


def test_kl_penalty_as_disco():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]], dtype=F64)
    new = torch.tensor([[-1.02, -1.97, -0.52], [-0.25, -0.30, 0.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    assert kl_estimate(new, old, mask).item() == pytest.approx(0.012, abs=1e-9)
    assert kl_estimate(new, old, mask, "low_var_kl").item() == pytest.approx(0.000416231, abs=1e-6)
    assert kl_penalty(torch.tensor(0.012, dtype=F64), 1e-4, 1e3).item() == pytest.approx(0.1428, abs=1e-9)
    ctx = GroupContext(token_logps=new, old_token_logps=old, mask=mask, advantages=torch.zeros(2, dtype=F64),
                       config=DRPOConfig(), rows_per_update=2, step_in_generation=1)  # fmt: skip
    out = DRPO().loss(ctx)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.1428, abs=1e-6)
    assert new.grad[mask > 0].tolist() == pytest.approx([-11.9 / 5] * 5)  # β(K̂ − δ) ∂K̂/∂logp


def test_config_validation():
    assert DRPOConfig().model_dump() == {"length_lambda": 0.1, "max_length": 8192, "tau": 10.0, "delta": 1e-4,
                                         "kl_beta": 1e3, "kl_type": "kl", "threshold": 0.5}  # fmt: skip
    for bad in ({"length_lambda": 0.0}, {"max_length": 0}, {"tau": -1.0}, {"kl_beta": -1.0}, {"beta": 0.1}):
        with pytest.raises(ValidationError):
            DRPOConfig(**bad)
    assert DRPOConfig(length_lambda=math.inf).length_lambda == math.inf


def test_a_binary_verifiers_pass_rate_rises(tmp_path, one_thread):
    regex = get_registry().get_scorer("regex")
    trainer = tiny_group_trainer(DRPO, tmp_path, method_args={"max_length": 16}, max_steps=20,
                                 scorers=[(regex(regex.Config(pattern="7")), 1.0)])  # fmt: skip
    trainer.train()
    curve = [e["rollout/reward"] for e in trainer.state.log_history if "rollout/reward" in e]
    first, last = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert last - first >= 0.5, curve  # measured: 0.042 → 0.975 (0.125, 0, 0, ..., 1, 0.875, 1, 1, 1): half the gain


def test_the_recipe_validates(monkeypatch):
    from trl_plus import check_recipe, load_recipe

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/drpo.yaml").read_text())
    assert recipe["method_args"] == {**DRPOConfig().model_dump(), "max_length": 16}
    assert recipe["method_args"]["max_length"] == recipe["rollout"]["decoding"]["max_new_tokens"]
    check_recipe(load_recipe("recipes/drpo.yaml"))  # (the plugin is installed: registered by its entry point)
