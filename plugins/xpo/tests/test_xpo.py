"""XPO: the card's worked example (loss and gradients, α = 1e-5 and 0.1), the labelling rule (ties to the policy
sample) and its ``ref_is_chosen`` field, the bonus's invariances, IPO, the α schedule, reference samples drawn with
the adapter off (a spy), and a run where the policy's reward rises while the reference's stays put."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_xpo import XPO

from trl_plus import Rollout, Rollouts, TrlPlusError, get_registry
from trl_plus.testing import make_context, tiny_trainer, training_logs

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = [{"prompt": f"Count to {i}:"} for i in range(16)]


def rollouts(policy: list[float], reference: list[float], eos: list[bool] | None = None) -> Rollouts:
    """One policy and one reference sample per prompt (group-major: policy, reference); completion ids = [row]."""
    n = 2 * len(policy)
    scores = [s for pair in zip(policy, reference) for s in pair]
    return Rollouts(prompt_ids=[[100 + i // 2] for i in range(n)], completion_ids=[[i] for i in range(n)],
                    prompts=[""] * n, completions=[""] * n, group=torch.arange(n) // 2,
                    source=["policy", "reference"] * len(policy),
                    scores=torch.tensor(scores, dtype=torch.float64)[:, None],
                    weights=torch.ones(1, dtype=torch.float64),
                    eos=torch.tensor(eos or [True] * n), lengths=torch.ones(n))  # fmt: skip


# The card (β = 0.1, B = 2): policy samples y: ℓθ = [−12, −20], ℓref = [−13, −19]; reference samples ỹ: ℓθ = [−15,
# −18], ℓref = [−14, −18.5]; model_chosen = [True, False] → chosen (y₁, ỹ₂), rejected (ỹ₁, y₂).
CARD_POLICY = [[[-12.0], [-18.0]], [[-15.0], [-20.0]]]  # [chosen, rejected][prompt]
CARD_REFERENCE = [[[-13.0], [-18.5]], [[-14.0], [-19.0]]]
REF_IS_CHOSEN = torch.tensor([False, True])


def card_context(policy=CARD_POLICY, reference=CARD_REFERENCE, ref_is_chosen=REF_IS_CHOSEN):
    return make_context(policy, reference, batch={"ref_is_chosen": ref_is_chosen})


def test_card_worked_example_labels_loss_and_gradients():
    rows = XPO().make_examples(rollouts(policy=[0.9, 0.2], reference=[0.1, 0.6]))  # model_chosen = [True, False]
    assert [(r["chosen_ids"], r["rejected_ids"], r["ref_is_chosen"]) for r in rows] == [([0], [1], False),
                                                                                        ([3], [2], True)]
    ctx = card_context()
    out = XPO(alpha=1e-5).loss(ctx)
    assert out.loss.item() == pytest.approx(0.609383, abs=1e-6)  # Δ = [2, 1.5]; DPO parts [0.598139, 0.620957]
    assert out.metrics["loss/dpo"].item() == pytest.approx((0.598139 + 0.620957) / 2, abs=1e-6)
    assert out.metrics["loss/xpo"].item() == pytest.approx(1e-5 * (-15 - 18) / 2, abs=1e-12)  # bonus [−1.5e-4, −1.8e-4]
    out.loss.backward()
    grad = ctx.token_logps.grad[..., 0]  # [chosen, rejected] = [[y₁, ỹ₂], [ỹ₁, y₂]]
    assert [grad[0, 0].item(), grad[1, 1].item()] == pytest.approx([-0.0225083, 0.0231285], abs=1e-7)  # ∂L/∂ℓθ(y)
    assert [grad[1, 0].item(), grad[0, 1].item()] == pytest.approx([0.0225133, -0.0231235], abs=1e-7)  # ∂L/∂ℓθ(ỹ)
    ctx = card_context()
    out = XPO(alpha=0.1).loss(ctx)
    assert out.loss.item() == pytest.approx(-1.040452, abs=1e-6)
    out.loss.backward()
    assert [ctx.token_logps.grad[1, 0, 0].item(), ctx.token_logps.grad[0, 1, 0].item()] == pytest.approx(
        [0.0725083, 0.0268715], abs=1e-7)
    assert torch.allclose(out.rewards, 0.1 * (ctx.logps() - ctx.ref_logps()).detach())


def test_ipo_is_the_token_sum_form_plus_the_bonus():
    # (Δ − 1/(2β))² = [(2 − 5)², (1.5 − 5)²] = [9, 12.25]
    assert XPO(loss_type="ipo").loss(card_context()).loss.item() == pytest.approx(10.625 - 1.65e-4, abs=1e-9)


def test_the_bonus_gradient_is_alpha_over_b_and_touches_only_the_reference_sample():
    base, bonus = card_context(), card_context()
    XPO(alpha=0.0).loss(base).loss.backward()
    XPO(alpha=0.3).loss(bonus).loss.backward()
    extra = bonus.token_logps.grad - base.token_logps.grad  # ∂(α·mean ℓθ(ỹ)): +α/B on ỹ's tokens, 0 on y's
    assert torch.allclose(extra[..., 0], torch.tensor([[0.0, 0.15], [0.15, 0.0]], dtype=torch.float64), atol=1e-12)


def test_the_bonus_ignores_beta_and_the_reference_and_the_dpo_part_ignores_alpha():
    def parts(**kwargs):
        ctx = card_context(**{k: v for k, v in kwargs.items() if k in ("reference", "ref_is_chosen")})
        out = XPO(**{k: v for k, v in kwargs.items() if k in ("alpha", "beta")}).loss(ctx)
        return out.metrics["loss/dpo"].item(), out.metrics["loss/xpo"].item()

    dpo, bonus = parts(alpha=0.1)
    assert parts(alpha=0.1, beta=0.5)[1] == bonus  # β does not touch the bonus
    assert parts(alpha=0.1, reference=[[[-1.0], [-2.0]], [[-3.0], [-4.0]]])[1] == bonus  # nor the reference
    assert parts(alpha=0.0)[0] == dpo and parts(alpha=0.0)[1] == 0.0  # α does not touch the DPO part
    # policy = reference: the DPO part is log 2 and L = log 2 + α·mean ℓθ(ỹ)
    same = XPO(alpha=0.1).loss(card_context(reference=CARD_POLICY))
    assert same.metrics["loss/dpo"].item() == pytest.approx(math.log(2), abs=1e-12)
    assert same.loss.item() == pytest.approx(math.log(2) + 0.1 * (-15 - 18) / 2, abs=1e-12)


def test_swapping_the_labels_flips_delta_but_leaves_the_bonus():
    # the same two samples of each prompt with the labels swapped: chosen ↔ rejected, ref_is_chosen negated
    swapped = card_context([CARD_POLICY[1], CARD_POLICY[0]], [CARD_REFERENCE[1], CARD_REFERENCE[0]], ~REF_IS_CHOSEN)
    ctx = card_context()
    ratios = ctx.logps() - ctx.ref_logps()
    ratios_swapped = swapped.logps() - swapped.ref_logps()
    assert (ratios[0] - ratios[1]).tolist() == (ratios_swapped[1] - ratios_swapped[0]).tolist()
    assert XPO(alpha=0.1).loss(swapped).metrics["loss/xpo"] == XPO(alpha=0.1).loss(ctx).metrics["loss/xpo"]


def test_labels_ties_go_to_the_policy_sample_and_the_eos_penalty():
    rows = XPO().make_examples(rollouts(policy=[1.0, 0.5], reference=[1.0, 0.4], eos=[False, True, True, True]))
    assert [r["ref_is_chosen"] for r in rows] == [False, False]  # prompt 1 a tie: the policy sample
    rows = XPO().make_examples(  # the stage's rollout.missing_eos_penalty: 0.5
        rollouts(policy=[1.0, 0.5], reference=[1.0, 0.4], eos=[False, True, True, True]).penalize_missing_eos(0.5))
    assert [(r["chosen_ids"], r["ref_is_chosen"]) for r in rows] == [([1], True), ([2], False)]
    policy_only = rollouts([1.0], [0.0])
    policy_only.source = ["policy", "policy"]
    with pytest.raises(TrlPlusError, match="rollout.sources must hold policy and reference"):
        XPO().make_examples(policy_only)


def test_alpha_per_epoch_schedule_and_config():
    xpo = XPO(alpha=[1e-5, 1e-4, 1e-3])
    assert [xpo.alpha(e) for e in (0.0, 0.99, 1.0, 2.5, 7.0)] == [1e-5, 1e-5, 1e-4, 1e-3, 1e-3]  # last one reused
    ctx = card_context()
    ctx.epoch = 1.5
    assert xpo.loss(ctx).metrics["alpha"] == 1e-4
    assert XPO().config.alpha == 1e-5 and XPO().config.beta == 0.1 and XPO().config.loss_type == "sigmoid"
    with pytest.raises(ValidationError):
        XPO(loss_type="hinge")
    with pytest.raises(ValidationError):
        XPO(alpah=0.1)
    cls = get_registry().get("xpo")
    assert cls.needs.rollout.n == 1 and cls.needs.rollout.sources == ("policy", "reference")
    assert cls.required_columns() == ("prompt",)  # ref_is_chosen is written by make_examples, not read from data


def test_the_reference_samples_come_from_the_adapter_off_policy(tmp_path, monkeypatch):
    """A spy on generate: every step samples once with the adapter on (the policy) and once with it off."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    digits = get_registry().get_scorer("digits")
    trainer = tiny_trainer(XPO, tmp_path, rows=PROMPTS, max_steps=3, scorers=[(digits(), 1.0)],
                           rollout=Rollout(n=1, sources=("policy", "reference"), decoding={"max_new_tokens": 4}),
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))  # fmt: skip
    policy = trainer.accelerator.unwrap_model(trainer.model)
    layer = next(m for m in policy.modules() if isinstance(m, BaseTunerLayer))
    real, seen = type(policy.get_base_model()).generate, []

    def spy(model, *args, **kwargs):
        seen.append(layer.disable_adapters)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(type(policy.get_base_model()), "generate", spy)
    trainer.train()
    assert seen == [False, True] * 3  # per step: the policy (adapter on), then the reference (adapter off)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_B" in n)
    logs = training_logs(trainer)
    assert all("rollout/reward_policy" in e and "rollout/reward_reference" in e for e in logs)


def test_the_policy_reward_rises_and_the_reference_reward_does_not(tmp_path):
    """Full fine-tuning (the reference, anchor and sampler, is a frozen copy), the digits scorer, 20 steps: what the
    policy writes improves, what the reference writes does not (it never trains)."""
    trainer = tiny_trainer(XPO, tmp_path, rows=PROMPTS, max_steps=20, learning_rate=2e-2,
                           scorers=[(get_registry().get_scorer("digits")(), 1.0)],
                           rollout=Rollout(n=1, sources=("policy", "reference"),
                                           decoding={"max_new_tokens": 16, "temperature": 1.0}))  # fmt: skip
    trainer.train()
    logs = training_logs(trainer)
    assert logs[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference

    def mean(key, part):
        return sum(e[key] for e in part) / len(part)

    policy_rise = mean("rollout/reward_policy", logs[-5:]) - mean("rollout/reward_policy", logs[:5])
    reference_drift = mean("rollout/reward_reference", logs[-10:]) - mean("rollout/reward_reference", logs[:10])
    assert policy_rise > 3.0 and abs(reference_drift) < 1.0, (policy_rise, reference_drift)  # measured 5.1, 0.34


def test_the_recipe_validates(monkeypatch):
    """recipes/xpo.yaml: the tiny model, both sources, the digits scorer, TRL's defaults."""
    from trl_plus import check_recipe, load_recipe

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/xpo.yaml").read_text())
    assert recipe["method"] == "xpo" and recipe["rollout"]["sources"] == ["policy", "reference"]
    assert recipe["method_args"] == {"alpha": 1e-5, "beta": 0.1, "loss_type": "sigmoid"}
    check_recipe(load_recipe("recipes/xpo.yaml"))
