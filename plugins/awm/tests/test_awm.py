"""AWM: the card's worked example (advantages, ghuber ℓ, ∂L/∂MSE for ghuber and uniform), zero-advantage groups give
no gradient, bounded advantages, stratified draws, the EMA anchor's ramp at every step, one-line errors, and a
generation-side learning test on tiny-sd3 with the latent-mean scorer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from trl_plus_awm import AWM, awm_logps, group_advantages, stratified_indices

from trl_plus import LossContext, Rollout, TrlPlusError, get_registry
from trl_plus.testing import tiny_diffusion_trainer

FAST = Rollout(n=4, decoding={"steps": 4, "eta": 0.0, "guidance": 1.0})
REWARDS, MSE = [0.9, 0.1, 0.5, 0.5], [0.30, 0.40, 0.35, 0.50]


def scorer(name: str, **args):
    cls = get_registry().get_scorer(name)
    return cls(cls.Config(**args))


def context(advantages, mse, sigma=0.5):
    e = torch.tensor(mse, dtype=torch.float64, requires_grad=True)
    outputs = SimpleNamespace(mse=e, noised=SimpleNamespace(sigma=torch.full_like(e, sigma)), kl={})
    batch = {"advantage": torch.as_tensor(advantages, dtype=torch.float64)}
    return LossContext(token_logps=-e.detach().view(1, -1, 1), mask=torch.ones(1, len(mse), 1), batch=batch,
                       outputs=outputs), e  # fmt: skip


def test_card_worked_example():
    a = group_advantages(torch.tensor(REWARDS), torch.zeros(4, dtype=torch.long))
    assert a.tolist() == pytest.approx([0.282743, -0.282743, 0.0, 0.0], abs=1e-6)
    ell = awm_logps(torch.tensor(MSE, dtype=torch.float64), torch.full((4,), 0.5))
    assert ell.tolist() == pytest.approx([-1.47384, -1.58422, -1.53200, -1.67547], abs=1e-5)
    for weighting, grad in [("ghuber", [0.0871888, -0.0702678, 0, 0]), ("uniform", [0.0706857, -0.0706857, 0, 0])]:
        ctx, e = context(a, MSE)
        out = AWM(weighting=weighting, beta=0).loss(ctx)
        assert out.loss.item() == pytest.approx(0.0, abs=1e-12)  # ρ ≡ 1: −mean(A) = 0 for centred advantages
        out.loss.backward()
        assert e.grad.tolist() == pytest.approx(grad, abs=1e-6)


def test_a_group_of_equal_rewards_gives_no_gradient_and_advantages_are_bounded():
    a = group_advantages(torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert a[:3].tolist() == [0.0, 0.0, 0.0]
    ctx, e = context(a[:3], [0.2, 0.3, 0.4])
    AWM(beta=0).loss(ctx).loss.backward()
    assert e.grad.abs().sum().item() == 0.0
    wild = group_advantages(torch.tensor([100.0] + [0.0] * 99), torch.zeros(100, dtype=torch.long))
    assert wild.abs().max().item() == pytest.approx(1.0) and (wild.abs() <= 1).all()


def test_stratified_draws_cover_the_grid_without_the_first_index():
    index = torch.stack([stratified_indices(14, 6, 0.9, torch.Generator().manual_seed(s)) for s in range(50)])
    assert index.min().item() >= 1 and index.max().item() <= 11
    lower = torch.tensor([1, 2, 4, 6, 8, 10])
    assert ((index >= lower) & (index < torch.tensor([2, 4, 6, 8, 10, 12]))).all()


def trainer(tmp_path, **kwargs):
    rows = [{"prompt": f"prompt {i}"} for i in range(2)]
    kwargs.setdefault("scorers", [(scorer("latent-mean"), 1.0)])
    return tiny_diffusion_trainer("awm", tmp_path, target="flow", rows=rows, rollout=FAST, batch_size=2, **kwargs)


def test_the_ema_anchor_is_updated_at_every_step_with_the_ramp(tmp_path, monkeypatch):
    tr = trainer(tmp_path, max_steps=3, learning_rate=1e-3)
    decays = []
    state = tr.parameter_state("ema")
    update = type(state).update

    def record(self, model, decay=0.0):
        if self is state:
            before = {k: v.clone() for k, v in self.tensors.items()}
            update(self, model, decay)
            name = self.names[0]
            theta = dict(model.named_parameters())[name].detach()
            assert torch.allclose(self.tensors[name], decay * before[name] + (1 - decay) * theta, atol=1e-6)
            decays.append(decay)
        else:
            update(self, model, decay)

    monkeypatch.setattr(type(state), "update", record)
    tr.train()
    assert decays == pytest.approx([0.001, 0.002, 0.003]) and state.updates == 3
    logs = tr.state.log_history[0]
    assert logs["awm/kl_ema"] == 0.0 and logs["awm/kl_ref"] == 0.0  # at step 0 anchor == reference == policy


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(TrlPlusError, match="beta"):
        trainer(tmp_path, max_steps=1, reference_mode="none").train()
    with pytest.raises(TrlPlusError, match="ctx.outputs"):
        AWM().loss(LossContext(token_logps=-torch.ones(1, 2, 1), mask=torch.ones(1, 2, 1)))


@pytest.mark.parametrize("beta", [0.001, 0.0])
def test_samples_raise_the_latent_mean_reward(tmp_path, beta):
    tr = trainer(tmp_path, max_steps=8, learning_rate=1e-3, method_args={"beta": beta},
                 reference_mode="auto" if beta else "none")  # fmt: skip
    assert tr.reference_mode == ("model" if beta else "none")
    before = tr.sample_reward(seed=0)
    tr.train()
    after = tr.sample_reward(seed=0)
    print(f"awm beta={beta} sample reward {before:.4f} -> {after:.4f}")
    assert after > before + 0.01, (before, after)
