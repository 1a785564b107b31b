"""Flow-DPO: the card's worked example (constant β, β(1 − t)², flow_grpo's β), the flow target only, step-one
log 2 and equality with diffusion-dpo on the same flow model and draws."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from trl_plus_flow_dpo import FlowDPO

from trl_plus import TrlPlusError
from trl_plus.testing import make_context, tiny_diffusion_trainer, training_logs

# The card's two pairs: e as element-mean errors, ℓ = −½·e.
E_POLICY_W, E_REF_W, E_POLICY_L, E_REF_L = [0.50, 0.90], [0.502, 0.899], [0.60, 0.80], [0.599, 0.801]
T = torch.tensor([0.2, 0.8], dtype=torch.float64)


def card_context():
    def ell(values):
        return [[-0.5 * v] for v in values]

    return make_context([ell(E_POLICY_W), ell(E_POLICY_L)], [ell(E_REF_W), ell(E_REF_L)],
                        outputs=SimpleNamespace(noised=SimpleNamespace(sigma=torch.cat([T, T]))))  # fmt: skip


@pytest.mark.parametrize("args, expected", [({"beta": 500}, 0.680474), ({"beta": 500, "beta_schedule": "elbo"}, 0.592436),
                                            ({"beta": 100}, 0.682677)], ids=["constant", "elbo", "flow_grpo"])
def test_card_worked_example(args, expected):
    assert FlowDPO(**args).loss(card_context()).loss.item() == pytest.approx(expected, abs=1e-6)


def test_elbo_weighting_silences_high_noise_pairs():
    ctx = card_context()
    FlowDPO(beta=500, beta_schedule="elbo").loss(ctx).loss.backward()
    high, low = ctx.token_logps.grad[0, 1, 0].abs(), ctx.token_logps.grad[0, 0, 0].abs()
    assert high < 0.1 * low  # t = 0.8: factor (1 − 0.8)² = 0.04 against 0.64


def test_only_the_flow_target(tmp_path):
    with pytest.raises(TrlPlusError, match="trains flow targets, but the scheduler"):
        tiny_diffusion_trainer("flow-dpo", tmp_path, target="epsilon")


def test_step_one_is_log2_and_equals_diffusion_dpo_on_the_same_draws(tmp_path):
    training = {"timestep_sampling": "logit_normal"}
    runs = {}
    for name in ("flow-dpo", "diffusion-dpo"):
        trainer = tiny_diffusion_trainer(name, tmp_path / name, target="flow", max_steps=2, learning_rate=1e-3,
                                         method_args={"beta": 100.0}, training=training)  # fmt: skip
        trainer.train()
        runs[name] = [log["loss"] for log in training_logs(trainer)]
    assert runs["flow-dpo"][0] == pytest.approx(math.log(2), abs=1e-7)
    assert runs["flow-dpo"] == runs["diffusion-dpo"] and runs["flow-dpo"][-1] != pytest.approx(math.log(2))


def test_elbo_schedule_equals_the_core_flow_elbo_weighting_on_the_same_draws(tmp_path):
    """β·(1 − t)² in the loss is the core's ``training.weighting: flow_elbo`` (ℓ = −½(1 − σ)²·e) under a constant β:
    t is shared by the pair, so the factor moves out of the margin."""
    from trl_plus.testing import diffusion_batch, diffusion_loss, perturb

    losses = []
    for method_args, training in (({"beta": 500, "beta_schedule": "elbo"}, {}),
                                  ({"beta": 500}, {"weighting": "flow_elbo"})):  # fmt: skip
        trainer = tiny_diffusion_trainer("flow-dpo", tmp_path / str(len(losses)), target="flow",
                                         method_args=method_args, training=training)  # fmt: skip
        perturb(trainer.model, scale=0.01)  # policy ≠ the frozen reference
        losses.append(diffusion_loss(trainer, diffusion_batch(trainer), seed=3).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] != pytest.approx(math.log(2), abs=1e-3)
