"""DisCO: the card's worked example (J and ∂(−J)/∂s for DisCO-b, τ = 10 and τ = 1; the KL estimates and the
penalty), the official code's S/sg(S) value and its gradient, invalid groups counting in Q, shift invariance,
τ → ∞ = DisCO-b, Lratio = 1 at π_θ = π_old, Dr. GRPO's advantages = p(1 − p)·DisCO-b's, the coefficients through
advantages() and loss() on whole and split batches, the KL penalty off on the first optimiser step of each
generation batch and on later, a binary verifier's pass rate rising, and the recipe validating."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_disco import DisCO, DisCOConfig, coefficients, disco_objective, kl_estimate, kl_penalty, negative_weights

from trl_plus import GroupContext, Rollouts, get_registry
from trl_plus.testing import tiny_group_trainer

ROOT = Path(__file__).resolve().parents[3]
F64 = torch.float64

# The card: Q = 2; question 1 rewards [1, 0, 1, 0], scores [−0.30, −0.90, −0.50, −1.20]; question 2 all correct.
REWARDS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=F64)
SCORES = torch.tensor([[-0.30, -0.90, -0.50, -1.20], [-0.4, -0.7, -0.2, -1.5]], dtype=F64)
CARD = {  # variant, τ → J, ∂(−J)/∂s of question 1
    ("disco-b", 10.0): (0.325, [-0.25, 0.25, -0.25, 0.25]),
    ("disco", 10.0): (0.324438, [-0.25, 0.253750, -0.25, 0.246250]),
    ("disco", 1.0): (0.319396, [-0.25, 0.287221, -0.25, 0.212779]),
}


def grad_of_minus_J(variant: str, tau: float) -> tuple[float, torch.Tensor]:
    scores = SCORES.clone().requires_grad_(True)
    J = disco_objective(scores, REWARDS, tau, variant)
    (-J).backward()
    return J.item(), scores.grad


@pytest.mark.parametrize(("variant", "tau"), list(CARD))
def test_card_worked_example_objective_and_gradients(variant, tau):
    expected_J, expected_grad = CARD[variant, tau]
    J, grad = grad_of_minus_J(variant, tau)
    assert J == pytest.approx(expected_J, abs=1e-6)
    assert grad[0].tolist() == pytest.approx(expected_grad, abs=1e-6)
    assert grad[1].tolist() == [0.0] * 4  # all correct: invalid, contributes 0 ...
    c = coefficients(SCORES, REWARDS, tau, variant)  # ... and the closed form of the gradient: −c/Q
    assert torch.allclose(-c / 2, grad, atol=1e-12, rtol=0)
    # signs: positives pushed up (−1/(|P|Q) each), negatives down; the negatives' p_j sum to 1
    assert (grad[0][[0, 2]] < 0).all() and (grad[0][[1, 3]] > 0).all()
    assert negative_weights(SCORES, REWARDS == 0, tau, variant)[0].sum().item() == pytest.approx(1.0, abs=1e-12)


def official_value(scores: torch.Tensor, rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """compute_policy_loss_disco_logL's J (Optimization-AI/DisCO, core_algos.py), line by line, minus the KL."""
    pos, neg = rewards == 1, rewards == 0
    valid = (pos.sum(1) != 0) & (neg.sum(1) != 0)
    s, pos, neg = scores[valid], pos[valid], neg[valid]
    neg_max = (s / tau).masked_fill(~neg, float("-inf")).max(-1, keepdim=True).values
    neg_exp = torch.exp(((s / tau) - neg_max.detach()) * neg) * neg
    neg_sum_exp = neg_exp.sum(-1, keepdim=True)
    neg_logmeanexp = neg_sum_exp / (neg_sum_exp.detach() + torch.finfo(neg_sum_exp.dtype).eps)
    per_question = ((s - tau * neg_logmeanexp) * pos).sum(1, keepdim=True) / pos.sum(1, keepdim=True)
    return per_question.sum() / rewards.size(0)


@pytest.mark.parametrize(("tau", "code_value"), [(10.0, -5.2), (1.0, -0.7)])
def test_the_official_codes_value_differs_by_a_constant_and_its_gradient_is_ours(tau, code_value):
    scores = SCORES.clone().requires_grad_(True)
    value = official_value(scores, REWARDS, tau)
    assert value.item() == pytest.approx(code_value, abs=1e-6)  # S/sg(S) ≈ 1: not the log-mean-exp
    value.backward()
    _, ours = grad_of_minus_J("disco", tau)
    assert torch.allclose(-scores.grad, ours, atol=1e-12, rtol=0)


def test_invariances_and_limits():
    shifted = SCORES + torch.tensor([[3.0], [-2.0]], dtype=F64)  # a constant per question
    for variant, tau in CARD:
        assert disco_objective(shifted, REWARDS, tau, variant).item() == pytest.approx(
            disco_objective(SCORES, REWARDS, tau, variant).item(), abs=1e-12)
    # τ → ∞: DisCO → DisCO-b; τ → 0: the negative term → max_j s_j (p on the best negative)
    assert torch.allclose(coefficients(SCORES, REWARDS, 1e9), coefficients(SCORES, REWARDS, 10.0, "disco-b"),
                          atol=1e-9, rtol=0)  # fmt: skip
    assert coefficients(SCORES, REWARDS, 1e-4)[0].tolist() == pytest.approx([0.5, -1.0, 0.5, 0.0], abs=1e-12)
    # all wrong, all right: nothing; every question still counts in Q
    none = torch.zeros(1, 4, dtype=F64)
    assert coefficients(SCORES[:1], none).abs().sum().item() == 0.0
    assert 2 * disco_objective(SCORES, REWARDS).item() == pytest.approx(disco_objective(SCORES[:1], REWARDS[:1]).item())


def test_card_kl_estimates_and_penalty():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]], dtype=F64)
    new = torch.tensor([[-1.02, -1.97, -0.52], [-0.25, -0.30, 0.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    kl = kl_estimate(new, old, mask, "kl")
    assert kl.item() == pytest.approx(0.012, abs=1e-9)
    # the card prints 0.000416231; the formula (the official ppo_kl) gives 0.000416261 in float64: within 1e-6
    low_var = kl_estimate(new, old, mask, "low_var_kl").item()
    assert low_var == pytest.approx(0.000416231, abs=1e-6) and low_var == pytest.approx(0.000416261, abs=1e-9)
    k = kl.detach().clone().requires_grad_(True)
    penalty = kl_penalty(k, 1e-4, 1e3)
    penalty.backward()
    assert penalty.item() == pytest.approx(0.1428, abs=1e-6) and k.grad.item() == pytest.approx(11.9, abs=1e-9)
    below = torch.tensor(5e-5, dtype=F64, requires_grad=True)
    value = kl_penalty(below, 1e-4, 1e3)
    value.backward()
    assert value.item() == 0.0 and below.grad.item() == 0.0  # inactive while K̂ ≤ δ
    # the same through loss(): the micro-batch's K̂; step 0 of a generation batch has π_old = π_θ exactly
    for step, expected in [(1, 0.1428), (0, 0.0)]:
        ctx = GroupContext(token_logps=new, old_token_logps=old, mask=mask, advantages=torch.zeros(2, dtype=F64),
                           config=DisCOConfig(), rows_per_update=2, step_in_generation=step)  # fmt: skip
        out = DisCO().loss(ctx)
        assert out.loss.item() == pytest.approx(expected, abs=1e-6)
        assert out.metrics["disco/kl"].item() == pytest.approx(0.012 if step else 0.0, abs=1e-9)
    new.grad = None
    DisCO().loss(GroupContext(token_logps=new, old_token_logps=old, mask=mask, advantages=torch.zeros(2, dtype=F64),
                              config=DisCOConfig(), rows_per_update=4, step_in_generation=1)).loss.backward()
    assert new.grad[mask > 0].tolist() == pytest.approx([-11.9 / 5 / 2] * 5)  # half the update's rows: half the step


def card_rollouts(tokens_per_row: int = 1) -> Rollouts:
    """The card's 8 rollouts, each ``tokens_per_row`` tokens whose mean log-prob is its score."""
    n = SCORES.numel()
    old = SCORES.flatten()[:, None].repeat(1, tokens_per_row)
    return Rollouts(prompt_ids=[[0]] * n, completion_ids=[[1] * tokens_per_row] * n, prompts=[""] * n,
                    completions=[""] * n, group=torch.arange(n) // 4, source=["policy"] * n,
                    scores=REWARDS.flatten()[:, None], weights=torch.ones(1, dtype=F64),
                    eos=torch.ones(n, dtype=torch.bool), lengths=torch.full((n,), float(tokens_per_row), dtype=F64),
                    old_token_logps=old)  # fmt: skip


@pytest.mark.parametrize(("variant", "tau"), list(CARD))
def test_advantages_and_loss_give_the_cards_gradient_on_whole_and_split_batches(variant, tau):
    method = DisCO(variant=variant, tau=tau)
    rollouts = card_rollouts(tokens_per_row=2)
    advantages = method.advantages(rollouts, torch.zeros(8, dtype=F64))
    assert advantages.tolist() == pytest.approx((4 * coefficients(SCORES, REWARDS, tau, variant)).flatten().tolist())
    expected = torch.tensor(CARD[variant, tau][1] + [0.0] * 4, dtype=F64)
    for parts in ([range(8)], [[5, 0, 3], [7, 1], [2, 6, 4]]):  # one micro-batch, or three of a shuffled update
        token_logps = rollouts.old_token_logps.clone().requires_grad_(True)
        for rows in parts:
            rows = list(rows)
            ctx = GroupContext(token_logps=token_logps[rows], old_token_logps=rollouts.old_token_logps[rows],
                               mask=torch.ones(len(rows), 2, dtype=F64), advantages=advantages[rows],
                               config=method.config, rows_per_update=8, step_in_generation=0)  # fmt: skip
            out = method.loss(ctx)
            out.loss.backward()
        assert out.metrics["disco/objective"] == pytest.approx(CARD[variant, tau][0], abs=1e-6)
        assert out.metrics["disco/valid_groups"] == 0.5
        # ∂/∂(each of a row's 2 tokens) = ∂(−J)/∂s / 2
        assert (2 * token_logps.grad[:, 0]).tolist() == pytest.approx(expected.tolist(), abs=1e-6)
        closed_form = -coefficients(SCORES, REWARDS, tau, variant).flatten() / 2
        assert torch.allclose(2 * token_logps.grad[:, 0], closed_form, atol=1e-12, rtol=0)
        assert torch.equal(token_logps.grad[:, 0], token_logps.grad[:, 1])


def test_lratio_scores_are_one_at_the_sampling_policy_and_its_gradient_is_disco_b():
    rollouts = card_rollouts(tokens_per_row=3)
    grads = {}
    for score, variant in [("Lratio", "disco"), ("logL", "disco-b")]:
        method = DisCO(score=score, variant=variant, tau=1.0)
        assert torch.equal(method.sampling_scores(rollouts), torch.ones(8, dtype=F64)) or score == "logL"
        advantages = method.advantages(rollouts, torch.zeros(8, dtype=F64))
        token_logps = rollouts.old_token_logps.clone().requires_grad_(True)
        ctx = GroupContext(token_logps=token_logps, old_token_logps=rollouts.old_token_logps.clone(),
                           mask=torch.ones(8, 3, dtype=F64), advantages=advantages, config=method.config,
                           rows_per_update=8, step_in_generation=1)  # fmt: skip
        if score == "Lratio":
            assert method.scores(ctx, ctx.old_token_logps).tolist() == [1.0] * 8
        method.loss(ctx).loss.backward()
        grads[score] = token_logps.grad
    assert torch.allclose(grads["Lratio"], grads["logL"], atol=1e-12, rtol=0)


def test_dr_grpo_advantages_are_disco_b_times_the_difficulty_weight():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]], dtype=F64)
    p = rewards.mean(-1, keepdim=True)
    disco_b = 4 * coefficients(torch.zeros_like(rewards), rewards, variant="disco-b")
    assert torch.allclose(p * (1 - p) * disco_b, rewards - p, atol=1e-12, rtol=0)


def test_config_validation():
    assert DisCOConfig().model_dump() == {"score": "logL", "variant": "disco", "tau": 10.0, "delta": 1e-4,
                                          "kl_beta": 1e3, "kl_type": "kl", "threshold": 0.5}  # fmt: skip
    for bad in ({"tau": 0.0}, {"delta": -1e-4}, {"kl_beta": -1.0}, {"score": "ratio"}, {"beta": 0.1}):
        with pytest.raises(ValidationError):
            DisCOConfig(**bad)
    assert not hasattr(DisCOConfig(), "beta")  # no reference model: TRL's beta stays 0


def trainer(tmp_path, steps: int, batch: int, **extra):
    regex = get_registry().get_scorer("regex")
    return tiny_group_trainer(DisCO, tmp_path, max_steps=steps, scorers=[(regex(regex.Config(pattern="7")), 1.0)],
                              training={"per_device_train_batch_size": batch, **extra})  # fmt: skip


def logged(trainer, key: str) -> list[float]:
    return [e[key] for e in trainer.state.log_history if key in e]


def test_the_kl_penalty_is_off_on_each_generation_batchs_first_step_and_acts_later(tmp_path, one_thread):
    t = trainer(tmp_path, steps=6, batch=4, steps_per_generation=4)  # 16 completions = 4 groups, 4 updates each
    t.train()
    kl, penalty = logged(t, "disco/kl"), logged(t, "disco/penalty")
    assert len(kl) == 6
    assert [kl[0], kl[4], penalty[0], penalty[4]] == [0.0] * 4  # steps 1 and 5: new generations, ratio exactly 1
    later = [1, 2, 3, 5]
    assert max(penalty[i] for i in later) > 0 and max(kl[i] for i in later) > 1e-4, (kl, penalty)
    assert all((p > 0) == (k > 1e-4) for k, p in zip(kl, penalty, strict=True))  # active exactly when K̂ > δ


def test_a_binary_verifiers_pass_rate_rises(tmp_path, one_thread):
    t = trainer(tmp_path, steps=20, batch=8)
    t.train()
    curve = logged(t, "rollout/reward")  # the pass rate of the step's 8 completions (contain a "7")
    first, last = sum(curve[:3]) / 3, sum(curve[-5:]) / 5
    assert last - first >= 0.5, curve  # measured: 0.042 → 1.0 (0.125, 0, 0, ..., 1, 1, 1, 1, 1): half the gain


def test_the_recipe_validates(monkeypatch):
    from trl_plus import check_recipe, load_recipe

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/disco.yaml").read_text())
    assert recipe["method_args"] == DisCOConfig().model_dump()
    assert recipe["training"]["per_device_train_batch_size"] % recipe["rollout"]["n"] == 0
    check_recipe(load_recipe("recipes/disco.yaml"))  # (the plugin is installed: registered by its entry point)
