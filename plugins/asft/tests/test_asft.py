"""ASFT: the card's worked example and special cases, stability at p → 1, gradients, real steps, the recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_asft import ASFT, log_odds, log_one_minus_exp

from trl_plus import SFT
from trl_plus.testing import forbid_reference, make_context, run_recipe_on_cpu, train_tiny, training_logs

ROOT = Path(__file__).resolve().parents[3]


def spread(total, n):
    """``n`` equal per-token log-probs summing to ``total``."""
    return [total / n] * n


# Card worked example (the SimPO card's pairs): mean log-probs pair 1 chosen −1.2, rejected −1.25;
# pair 2 chosen −1.25, rejected −2.25 (sums −12/10, −15/12, −20/16, −18/8 tokens).
CARD = [[spread(-12, 10), spread(-20, 16)], [spread(-15, 12), spread(-18, 8)]]
MEAN_LOGPS = [(-1.2, -1.25), (-1.25, -2.25)]


def test_card_worked_example():
    out = ASFT(align_weight=0.1).loss(make_context(CARD))
    assert out.loss.item() == pytest.approx(1.36995, abs=1e-5)
    for i, (expected, align) in enumerate([(1.353758, 1.537580), (1.386138, 1.361378)]):
        pair = ASFT(align_weight=0.1).loss(make_context([[s[i]] for s in CARD]))
        assert pair.loss.item() == pytest.approx(expected, abs=1e-6)
        assert pair.metrics["asft/align_loss"].item() == pytest.approx(align, abs=1e-6)
    # the same numbers from the closed form −(1+λ) log p_w − λ log(1 − p_l), by hand
    by_hand = [(1.1 * -w - 0.1 * math.log(1 - math.exp(l))) for w, l in MEAN_LOGPS]
    assert out.loss.item() == pytest.approx(sum(by_hand) / 2, abs=1e-12)
    # logged rewards are the log-odds r = log p − log(1 − p)
    expected_odds = [[lp - math.log(1 - math.exp(lp)) for lp in pair] for pair in MEAN_LOGPS]
    assert torch.allclose(out.rewards.T, torch.tensor(expected_odds, dtype=torch.float64), rtol=0, atol=1e-12)


def test_log_sigmoid_of_the_log_odds_is_log_p():
    logp = torch.tensor([-1e-6, -0.01, -0.5, -0.7, -1.25, -5.0, -40.0], dtype=torch.float64)
    assert torch.allclose(torch.nn.functional.logsigmoid(log_odds(logp)), logp, rtol=0, atol=1e-12)
    assert torch.allclose(torch.nn.functional.logsigmoid(-log_odds(logp)), torch.log1p(-torch.exp(logp)), atol=1e-12)


def test_log1mexp_agrees_with_trls_orpo_helper(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo.orpo_trainer import log1mexp

    logp = torch.tensor([-1e-5, -0.3, -0.6931, -0.6932, -2.0, -30.0], dtype=torch.float64)
    assert torch.allclose(log_one_minus_exp(logp), log1mexp(logp), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_stable_when_p_goes_to_one_and_to_zero(dtype):
    # rejected mean log-prob −1e-8 (p_l ≈ 1), exactly 0, and very negative; chosen likewise
    for w, l in [(-1e-8, -1e-8), (0.0, 0.0), (-1e4, -1e4), (-1e-8, -1e4), (-1e4, 0.0)]:
        ctx = make_context([[[w]], [[l]]])
        ctx.token_logps = ctx.token_logps.detach().to(dtype).requires_grad_(True)
        ctx.mask = ctx.mask.to(dtype)
        for beta in (1.0, 0.1):
            out = ASFT(align_weight=1.0, beta=beta).loss(ctx)
            (grad,) = torch.autograd.grad(out.loss, ctx.token_logps)
            assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), (dtype, w, l, beta)
    # float64, p_l = exp(−1e-8): the exact −log(1 − p_l) ≈ log(1e8) is kept (no clamp at this scale):
    # −log p_w − log(1 − p_l) = 1 + 18.420681
    ctx = make_context([[[-1.0]], [[-1e-8]]])
    out = ASFT(align_weight=1.0, include_sft_term=False).loss(ctx)
    assert out.loss.item() == pytest.approx(1.0 - math.log(-math.expm1(-1e-8)), rel=1e-12)
    assert out.loss.item() == pytest.approx(19.420681, abs=1e-6)


def test_lambda_zero_is_sft_on_the_chosen_responses():
    # per-sequence mean NLL of the chosen; equals the core `sft` (token mean over the batch) for one pair or equal
    # lengths
    out = ASFT(align_weight=0.0).loss(make_context(CARD)).loss.item()
    assert out == pytest.approx((1.2 + 1.25) / 2, abs=1e-12)
    equal_len = [[[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]], [[-3.0], [-4.0, -4.0]]]
    core = SFT().loss(make_context([equal_len[0]])).loss.item()
    assert ASFT(align_weight=0.0).loss(make_context(equal_len)).loss.item() == pytest.approx(core, abs=1e-12)


def test_tempered_beta_and_two_stage_form():
    beta = 0.5
    out = ASFT(align_weight=1.0, beta=beta, include_sft_term=False).loss(make_context(CARD)).loss.item()

    def nls(x):  # −log σ(x)
        return math.log1p(math.exp(-x))

    odds = [[lp - math.log(1 - math.exp(lp)) for lp in pair] for pair in MEAN_LOGPS]
    assert out == pytest.approx(sum(nls(beta * w) + nls(-beta * l) for w, l in odds) / 2, abs=1e-12)
    # β = 1 without the SFT term is −log p_w − log(1 − p_l)
    plain = ASFT(align_weight=1.0, include_sft_term=False).loss(make_context(CARD)).loss.item()
    assert plain == pytest.approx(sum(-w - math.log(1 - math.exp(l)) for w, l in MEAN_LOGPS) / 2, abs=1e-12)


def test_orpo_pairwise_term_is_a_lower_bound_of_the_pointwise_one():
    # −log σ(r_w − r_l) ≤ −log σ(r_w) − log σ(−r_l) (arXiv 2502.01237): check on a grid of mean log-probs
    grid = torch.tensor([-0.01, -0.3, -1.0, -2.5, -6.0], dtype=torch.float64)
    w, l = torch.meshgrid(grid, grid, indexing="ij")
    rw, rl = log_odds(w), log_odds(l)
    pointwise = -torch.nn.functional.logsigmoid(rw) - torch.nn.functional.logsigmoid(-rl)
    assert (-torch.nn.functional.logsigmoid(rw - rl) <= pointwise + 1e-12).all()


def test_duplicating_tokens_leaves_the_loss_unchanged():
    doubled = [[seq + seq for seq in side] for side in CARD]
    assert ASFT().loss(make_context(doubled)).loss.item() == pytest.approx(
        ASFT().loss(make_context(CARD)).loss.item(), abs=1e-12
    )


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_gradients_are_pointwise_with_the_cards_magnitudes(lam):
    ctx = make_context(CARD)
    ASFT(align_weight=lam).loss(ctx).loss.backward()
    g = ctx.token_logps.grad
    for i, ((w, l), n_w, n_l) in enumerate(zip(MEAN_LOGPS, [10, 16], [12, 8])):
        # ∂L/∂log p_w = −(1+λ), ∂L/∂log p_l = λ p_l / (1 − p_l); mean over B = 2 pairs, log p = sum / n
        p_l = math.exp(l)
        assert g[0, i, :n_w].tolist() == pytest.approx([-(1 + lam) / 2 / n_w] * n_w, rel=1e-12)
        assert g[1, i, :n_l].tolist() == pytest.approx([lam * p_l / (1 - p_l) / 2 / n_l] * n_l, rel=1e-12)
    assert (g[0][ctx.mask[0] > 0] < 0).all() and (g[1][ctx.mask[1] > 0] > 0).all()
    assert (g[ctx.mask == 0] == 0).all()
    # pointwise: the chosen gradient ignores the rejected response and vice versa
    other = make_context([CARD[0], [spread(-3.0, 5), spread(-0.2, 2)]])
    ASFT(align_weight=lam).loss(other).loss.backward()
    assert torch.equal(other.token_logps.grad[0][other.mask[0] > 0], g[0][ctx.mask[0] > 0])
    other = make_context([[spread(-7.0, 3), spread(-1.0, 9)], CARD[1]])
    ASFT(align_weight=lam).loss(other).loss.backward()
    assert torch.equal(other.token_logps.grad[1][other.mask[1] > 0], g[1][ctx.mask[1] > 0])


def test_config_validation():
    with pytest.raises(ValidationError):
        ASFT(align_weight=-0.1)
    with pytest.raises(ValidationError):
        ASFT(beta=0.0)
    with pytest.raises(ValidationError):
        ASFT(lambda_=0.1)  # a typo is an error, not a silently ignored key
    assert ASFT().config.beta == 1.0



def test_default_lambda_is_one_as_its_sources():
    """λ = 1.0: arXiv 2502.01237 §5.1 found it best in its grid {0.1, 0.2, 0.5, 1.0} for one-stage ASFT, and
    turbo-llm/turbo-alignment's ASFTLoss defaults to lambda_=1.0 (beta=1.0). The default is stated with its source."""
    field = ASFT.Config.model_fields["align_weight"]
    assert field.default == 1.0 and ASFT().config.align_weight == 1.0
    assert "2502.01237" in field.description and "lambda_=1.0" in field.description
    ctx = make_context(CARD)
    assert ASFT().loss(ctx).loss.item() == ASFT(align_weight=1.0).loss(ctx).loss.item()
    # λ = 1 in the closed form: −2 log p_w − log(1 − p_l), mean over the card's two pairs
    by_hand = [(2 * -w - math.log(1 - math.exp(l))) for w, l in MEAN_LOGPS]
    assert ASFT().loss(ctx).loss.item() == pytest.approx(sum(by_hand) / 2, rel=1e-12)
    recipe = yaml.safe_load((ROOT / "recipes/asft.yaml").read_text())
    assert recipe["method_args"]["align_weight"] == 1.0


def test_no_reference_and_a_few_steps_raise_the_margin(tmp_path, monkeypatch):
    forbid_reference(monkeypatch)
    trainer = train_tiny("asft", tmp_path, max_steps=8)
    assert trainer.ref_model is None and trainer.reference_mode == "none"
    logs = training_logs(trainer)
    assert len(logs) == 8
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/chosen"] > logs[0]["rewards/chosen"]
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/asft.yaml").read_text())
    assert recipe["method"] == "asft" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/asft.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
