"""TGDPO: the card's worked example, its reductions to DPO, the gradient by autograd, padding, errors; through the
real trainer: guidance == reference ≡ DPO, live / precomputed / adapter guidance agree, real steps raise margins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_tgdpo import TGDPO, token_weights

from trl_plus import DPO, FrozenOutputs, Teacher, TrlPlusError
from trl_plus.testing import (
    build_model,
    build_tokenizer,
    make_context,
    perturb,
    preference_rows,
    run_recipe_on_cpu,
    tiny_trainer,
    train_tiny,
    training_logs,
)

ROOT = Path(__file__).resolve().parents[3]

# The card's worked example (shared/methods/tgdpo.md), β = 0.1: per-token log-probs [K][B][tokens].
POLICY = [[[-1.0, -2.0, -0.5], [-0.7, -1.1]], [[-1.5, -2.5], [-2.1, -0.3, -1.0]]]
REFERENCE = [[[-1.2, -1.8, -0.9], [-0.6, -1.3]], [[-1.4, -2.0], [-1.8, -0.4, -1.2]]]
GUIDE = [[[-0.8, -2.1, -0.4], [-0.5, -1.0]], [[-1.9, -2.2], [-2.4, -0.2, -1.5]]]


def guided(policy=POLICY, reference=REFERENCE, guide=GUIDE, **kwargs):
    """A hand-made context with the guidance model's log-probs as the frozen source ``guide``."""
    logps = make_context(guide, requires_grad=False).token_logps
    return make_context(policy, reference, frozen={"guide": FrozenOutputs(logps=logps)}, **kwargs)


def pair(i):
    return guided(*([[s[i]] for s in values] for values in (POLICY, REFERENCE, GUIDE)))


@pytest.mark.parametrize("alpha, per_pair, mean", [
    (0.5, [0.6432336, 0.6876872], 0.6654604),
    (0.0, [0.6443967, 0.6881597], 0.6662782),
    (1.0, None, 0.6646435),
])  # fmt: skip
def test_card_worked_example(alpha, per_pair, mean):
    assert TGDPO(beta=0.1, alpha=alpha).loss(guided()).loss.item() == pytest.approx(mean, abs=5e-8)
    for i, expected in enumerate(per_pair or []):
        assert TGDPO(beta=0.1, alpha=alpha).loss(pair(i)).loss.item() == pytest.approx(expected, abs=5e-8)


def test_card_weights_plus_on_chosen_minus_on_rejected():
    factors, reward = TGDPO(beta=0.1, alpha=0.5).token_weights(guided())
    weights = 0.1 * factors
    assert weights[0, 0].tolist() == pytest.approx([0.102, 0.0985, 0.1025], abs=1e-12)  # chosen: β(1 + α r̂)
    assert weights[1, 0, :2].tolist() == pytest.approx([0.1025, 0.101], abs=1e-12)  # rejected: β(1 − α r̂)
    # r̂ = β(log π_g − log π_ref): the rejected pair-1 tokens the guide dislikes (r̂ < 0) get the larger weight
    assert reward[1, 0, :2].tolist() == pytest.approx([-0.05, -0.02], abs=1e-12)
    assert weights[1, 0, 2].item() == 0.0 and weights[0, 1, 2].item() == 0.0  # padding


def test_alpha_zero_and_guide_equal_to_reference_are_dpo():
    dpo = DPO(beta=0.1).loss(make_context(POLICY, REFERENCE)).loss.item()
    assert TGDPO(alpha=0.0).loss(guided()).loss.item() == pytest.approx(dpo, abs=1e-15)
    for alpha in (0.5, 2.0):
        assert TGDPO(alpha=alpha).loss(guided(guide=REFERENCE)).loss.item() == pytest.approx(dpo, abs=1e-15)


def test_log2_at_init_for_any_alpha_and_guide():
    for alpha in (0.0, 0.5, 3.0):
        assert TGDPO(alpha=alpha).loss(guided(policy=REFERENCE)).loss.item() == pytest.approx(math.log(2), abs=1e-15)


def test_rewards_are_plain_dpo_rewards():
    out = TGDPO(beta=0.1, alpha=0.5).loss(guided())
    dpo = DPO(beta=0.1).loss(make_context(POLICY, REFERENCE))
    assert torch.allclose(out.rewards, dpo.rewards, atol=1e-15) and not out.rewards.requires_grad


def test_gradient_is_minus_sigma_times_weight_per_token():
    ctx = guided()
    out = TGDPO(beta=0.1, alpha=0.5).loss(ctx)
    out.loss.backward()
    factors, _ = TGDPO(beta=0.1, alpha=0.5).token_weights(guided())
    weights = 0.1 * factors
    rho = (ctx.token_logps - ctx.ref_token_logps).detach() * ctx.mask
    z = (weights[0] * rho[0]).sum(-1) - (weights[1] * rho[1]).sum(-1)
    batch = ctx.batch_size
    # ∂L/∂log πθ(y^w_t) = −σ(−z)·ω^w_t / B,  ∂L/∂log πθ(y^l_t) = +σ(−z)·ω^l_t / B
    expected = torch.stack([-torch.sigmoid(-z)[:, None] * weights[0], torch.sigmoid(-z)[:, None] * weights[1]]) / batch
    assert torch.allclose(ctx.token_logps.grad, expected, atol=1e-15)
    assert (ctx.token_logps.grad[0][ctx.mask[0].bool()] < 0).all() and (ctx.token_logps.grad[1][ctx.mask[1].bool()] > 0).all()


def test_weights_carry_no_gradient():
    guide = make_context(GUIDE).token_logps  # requires_grad: a guide that could be differentiated
    ctx = make_context(POLICY, REFERENCE, frozen={"guide": FrozenOutputs(logps=guide)})
    ctx.ref_token_logps.requires_grad_(True)
    TGDPO(alpha=0.5).loss(ctx).loss.backward()
    assert guide.grad is None
    # the reference's gradient is −∂L/∂ρ only (through ρ), not through r̂: the negative of the policy's
    assert torch.allclose(ctx.ref_token_logps.grad, -ctx.token_logps.grad, atol=1e-15)


def test_padding_either_response_leaves_the_loss_unchanged():
    base = TGDPO(alpha=0.5).loss(guided()).loss.item()
    ctx = guided()
    longer = {name: torch.nn.functional.pad(getattr(ctx, name), (0, 3), value=0.0)
              for name in ("token_logps", "mask", "ref_token_logps")}  # fmt: skip
    guide = torch.nn.functional.pad(ctx.frozen["guide"].logps, (0, 3), value=-7.0)  # garbage off the scored tokens
    noisy_policy = longer["token_logps"].detach().clone()
    noisy_policy[..., -3:] = -5.0  # garbage policy values off the mask too
    padded = make_context([[[0.0]]], requires_grad=False)
    padded.token_logps, padded.mask, padded.ref_token_logps = noisy_policy, longer["mask"], longer["ref_token_logps"]
    padded.frozen = {"guide": FrozenOutputs(logps=guide)}
    assert TGDPO(alpha=0.5).loss(padded).loss.item() == pytest.approx(base, abs=1e-15)


def test_min_weight_clamps_the_factor():
    ctx = guided(guide=[[[-0.8, -2.1, -0.4], [-0.5, -1.0]], [[40.0, -2.2], [-2.4, -0.2, -1.5]]])
    unclamped, _ = token_weights(ctx, alpha=0.5, beta=0.1)
    assert unclamped[1, 0, 0].item() == pytest.approx(1 - 0.5 * 0.1 * 41.4, abs=1e-12)  # −1.07: a negative weight
    clamped, _ = token_weights(ctx, alpha=0.5, beta=0.1, min_weight=0.0)
    assert clamped[1, 0, 0].item() == 0.0 and torch.equal(clamped[0], unclamped[0])
    assert TGDPO(alpha=0.5, min_weight=0.0).loss(ctx).metrics["tgdpo/min_factor"].item() == 0.0


def test_base_loss_variants_use_the_weighted_margin():
    # label smoothing (cDPO) on the token-weighted margin: with α = 0 it is DPO's
    ctx, ref = guided(), make_context(POLICY, REFERENCE)
    dpo = DPO(beta=0.1, label_smoothing=0.1).loss(ref).loss.item()
    assert TGDPO(alpha=0.0, label_smoothing=0.1).loss(ctx).loss.item() == pytest.approx(dpo, abs=1e-15)


def test_clear_errors():
    with pytest.raises(TrlPlusError, match="teachers.guide"):
        TGDPO().loss(make_context(POLICY, REFERENCE))
    with pytest.raises(TrlPlusError, match="reference"):
        TGDPO().loss(guided(reference=None))
    ctx = guided()
    ctx.frozen = {"guide": FrozenOutputs(logps=ctx.frozen["guide"].logps[..., :2])}  # another tokenizer's length
    with pytest.raises(TrlPlusError, match="tokenizer"):
        TGDPO().loss(ctx)
    for bad in ({"alpha": -0.1}, {"beta": 0}, {"tgdpo_alpha": 0.5}):
        with pytest.raises(ValidationError):
            TGDPO(**bad)
    with pytest.raises(TrlPlusError) as error:
        TGDPO().loss(make_context(POLICY, REFERENCE))
    assert "\n" not in str(error.value)


# -- through the real trainer (PlusTrainer(teachers={"guide": ...})) --------------------------------------------


def batch_of(trainer, n=8):
    """The first ``n`` training rows collated by the trainer's own collator (precomputed columns included)."""
    return trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(n)])


def loss_on(trainer, batch=None):
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch if batch is not None else batch_of(trainer)).item()


def perturbed(model, seed):
    perturb(model, seed=seed)
    return model.eval()


@pytest.fixture(autouse=True)
def _column_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_PLUS_CACHE", str(tmp_path / "cache"))  # precomputed columns: a cache of this test


def test_trainer_guide_equal_to_reference_and_alpha_zero_are_dpo(tmp_path):
    rows = preference_rows(8)
    same = tiny_trainer("tgdpo", tmp_path / "same", {"beta": 0.1, "alpha": 0.5}, rows=rows,
                        teachers={"guide": Teacher(model=build_model(build_tokenizer()))})  # = the reference
    guided_ = tiny_trainer("tgdpo", tmp_path / "guided", {"beta": 0.1, "alpha": 0.5}, rows=rows,
                           teachers={"guide": perturbed(build_model(build_tokenizer()), seed=3)})
    for t in (same, guided_):
        perturbed(t.model, seed=0)  # the same policy in both, away from the reference
    batch = batch_of(same)
    with_guide = loss_on(guided_, batch)
    guided_.method = DPO(beta=0.1)  # the same trainer and weights, the core's DPO
    base = loss_on(guided_, batch)
    guided_.method = TGDPO(beta=0.1, alpha=0.0)
    assert abs(base - math.log(2)) > 1e-3
    assert loss_on(same, batch) == pytest.approx(base, abs=1e-6)  # guide == reference
    assert loss_on(guided_, batch) == pytest.approx(base, abs=1e-6)  # α = 0
    assert abs(with_guide - base) > 1e-5  # a real guide changes the loss


def test_live_precomputed_and_adapter_guidance_agree(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rows = preference_rows(8)
    # a guidance model trained with LoRA on the policy's base: an adapter folder, and the same weights merged
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    guide = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    guide.save_pretrained(tmp_path / "guide-adapter")
    merged = guide.merge_and_unload().eval()

    def trainer(name, teacher):
        torch.manual_seed(2)
        policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        t = tiny_trainer("tgdpo", tmp_path / name, {"beta": 0.5, "alpha": 2.0}, rows=rows, model=policy,
                         teachers={"guide": teacher})
        for p in (q for n, q in t.model.named_parameters() if "lora_B" in n and ".default." in n):
            with torch.no_grad():
                p.add_(0.05)  # the trained adapter leaves the reference (its base)
        t.model.eval()
        return t

    live = trainer("live", Teacher(model=merged, mode="live"))
    pre = trainer("pre", Teacher(model=merged, mode="precomputed"))
    adapter = trainer("adapter", Teacher(adapter=str(tmp_path / "guide-adapter")))
    batch = batch_of(live)
    reference = loss_on(live, batch)
    assert loss_on(pre) == pytest.approx(reference, abs=1e-6)
    assert loss_on(adapter, batch) == pytest.approx(reference, abs=1e-5)
    live.method = TGDPO(beta=0.5, alpha=0.0)  # the same trainer and weights without guidance: DPO
    assert abs(loss_on(live, batch) - reference) > 1e-4  # the guide matters


def test_a_dpo_trained_guide_raises_margins(tmp_path):
    rows = preference_rows(16)
    dpo = train_tiny("dpo", tmp_path / "guide", rows=rows, max_steps=3)  # the guidance model: a few DPO steps
    guide = dpo.model.eval().requires_grad_(False)
    trainer = train_tiny("tgdpo", tmp_path / "tgdpo", method_args={"alpha": 0.5}, rows=rows, max_steps=5,
                         teachers={"guide": Teacher(model=guide, mode="precomputed")})
    logs = training_logs(trainer)

    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert logs[0]["tgdpo/token_reward_chosen"] > logs[0]["tgdpo/token_reward_rejected"]  # the guide prefers chosen
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/tgdpo.yaml").read_text())
    assert recipe["method"] == "tgdpo" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/tgdpo.yaml", tmp_path, "teachers.guide.name_or_path=tiny-llama",
                               "teachers.guide.quantization=null", "teachers.guide.dtype=float32")
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
