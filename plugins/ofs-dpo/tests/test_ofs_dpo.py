"""OFS-DPO: the card's worked example, the regulariser's stop-gradient, and through the real trainer with two named
adapters: both get gradients (the peft trap), λ = 0 gives each its own single-adapter DPO gradient, one SGD step
moves the fast adapter lr_scale times more, save → resume restores both; COFS's combination; the shipped recipe;
one-line errors before any model loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from trl_plus_ofs_dpo import FAST, OFSDPO, SLOW, cofs, ofs_terms

from trl_plus import DPO, TrlPlusError, check_recipe, combine, load_recipe
from trl_plus.testing import (
    adapter_context,
    forbid_model_loading,
    make_context,
    preference_rows,
    run_recipe_on_cpu,
    tiny_trainer,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[3]

# The card's example (β = 0.1, one pair, sums): [chosen], [rejected] per adapter, and the reference.
FAST_LOGPS = [[[-10.0]], [[-13.0]]]
SLOW_LOGPS = [[[-10.8]], [[-12.5]]]
REFERENCE = [[[-11.0]], [[-12.0]]]


def card_context():
    return adapter_context(REFERENCE, {FAST: FAST_LOGPS, SLOW: SLOW_LOGPS})


def test_card_worked_example():
    ctx = card_context()
    loss_fast, loss_slow, reg, _, _ = ofs_terms(ctx, beta=0.1)
    assert loss_fast.item() == pytest.approx(0.5981389, abs=1e-6)
    assert loss_slow.item() == pytest.approx(0.6587596, abs=1e-6)
    assert reg.item() == pytest.approx(0.6302582, abs=1e-6)
    out = OFSDPO(beta=0.1, lam=1.0).loss(ctx)
    assert out.loss.item() == pytest.approx(1.887157, abs=1e-6)
    assert out.rewards[:, 0].tolist() == pytest.approx([0.1, -0.1], abs=1e-12)  # β · the fast log-ratios
    # the gap regulariser: (log σ(β Δ_f) − log σ(β Δ_s))², Δ_f = 2, Δ_s = 0.7
    gap = ofs_terms(card_context(), beta=0.1, regulariser="gap")[2].item()
    assert gap == pytest.approx((math.log(1 / (1 + math.exp(-0.2))) - math.log(1 / (1 + math.exp(-0.07)))) ** 2)


def test_at_init_every_term_is_log2():
    same = [[[-5.0, -1.0]], [[-4.0]]]
    ctx = adapter_context(same, {FAST: same, SLOW: same})
    terms = ofs_terms(ctx, beta=0.1)[:3]
    assert [t.item() for t in terms] == pytest.approx([math.log(2)] * 3, abs=1e-12)


def test_the_chase_gives_the_slow_adapter_no_gradient_and_lambda_0_is_two_dpo_losses():
    ctx = card_context()
    ofs_terms(ctx, beta=0.1)[2].sum().backward()  # R alone
    assert ctx.for_adapter(SLOW).token_logps.grad is None or not ctx.for_adapter(SLOW).token_logps.grad.any()
    assert ctx.for_adapter(FAST).token_logps.grad.abs().sum() > 0

    ctx = card_context()
    OFSDPO(beta=0.1, lam=0.0).loss(ctx).loss.backward()
    for name, policy in ((FAST, FAST_LOGPS), (SLOW, SLOW_LOGPS)):
        alone = make_context(policy, REFERENCE)
        DPO(beta=0.1).loss(alone).loss.backward()
        assert torch.allclose(ctx.for_adapter(name).token_logps.grad, alone.token_logps.grad, atol=1e-12)


# -- the real trainer: two named adapters --------------------------------------------------------------------------


def lora(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      **kwargs)


def ofs_trainer(tmp_path, method_args=None, scales=(4.0, 1.0), random_b=False, **kwargs):
    torch.manual_seed(0)
    adapters = {FAST: lora(init_lora_weights=not random_b), SLOW: lora(init_lora_weights=not random_b)}
    return tiny_trainer("ofs-dpo", tmp_path, {"beta": 0.1, **(method_args or {})}, rows=preference_rows(16),
                        peft_config=adapters, adapter_lr_scales=dict(zip((FAST, SLOW), scales)), **kwargs)


def policy(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def first_batch(trainer, n=8):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def adapter_grads(model, name):
    return {n.replace(f".{name}.", "."): p.grad for n, p in model.named_parameters() if f".{name}." in n}


def test_both_adapters_get_gradients_after_one_backward(tmp_path):
    trainer = ofs_trainer(tmp_path)
    model = policy(trainer)
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))  # policy (2 adapters) + reference (all off)
    loss.backward()
    for name in (FAST, SLOW):
        grads = {n: g for n, g in adapter_grads(model, name).items() if "lora_B" in n}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), name
        assert all(p.requires_grad for n, p in model.named_parameters() if f".{name}." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    assert "ref" not in model.peft_config and "default" not in model.peft_config


def test_lambda_0_gives_each_adapter_its_single_adapter_dpo_gradient(tmp_path):
    trainer = ofs_trainer(tmp_path / "ofs", {"lam": 0.0}, random_b=True)  # B ≠ 0: the adapters move the policy
    model = policy(trainer)
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    for name in (FAST, SLOW):
        single = tiny_trainer("dpo", tmp_path / name, {"beta": 0.1}, rows=preference_rows(16), peft_config=lora())
        alone = policy(single)
        state = {n.replace(f".{name}.", ".default."): p.detach() for n, p in model.named_parameters()
                 if f".{name}." in n}  # fmt: skip
        with torch.no_grad():
            for n, p in alone.named_parameters():
                if ".default." in n:
                    p.copy_(state[n])
        single.compute_loss(single.model, dict(batch)).backward()
        theirs = adapter_grads(alone, "default")
        ours = adapter_grads(model, name)
        assert ours.keys() == theirs.keys()
        for key, grad in ours.items():
            assert torch.allclose(grad, theirs[key], atol=1e-6, rtol=0), (name, key)
        assert max(g.abs().max().item() for g in ours.values()) > 1e-4


def test_with_identical_gradients_one_sgd_step_moves_fast_lr_scale_times_more(tmp_path):
    trainer = ofs_trainer(tmp_path, {"lam": 0.0}, scales=(4.0, 1.0), random_b=True, max_steps=1,
                          training={"optim": "sgd", "lr_scheduler_type": "constant"})  # fmt: skip
    model = policy(trainer)
    with torch.no_grad():  # the slow adapter := the fast one: identical forwards, identical gradients
        params = dict(model.named_parameters())
        for n, p in params.items():
            if f".{SLOW}." in n:
                p.copy_(params[n.replace(f".{SLOW}.", f".{FAST}.")])
    before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    trainer.train()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([4 * 5e-3, 5e-3])
    moved = 0.0
    for n, p in params.items():
        if f".{FAST}." in n:
            step_fast = p.detach() - before[n]
            slow = n.replace(f".{FAST}.", f".{SLOW}.")
            step_slow = params[slow].detach() - before[slow]
            assert torch.allclose(step_fast, 4.0 * step_slow, atol=1e-7, rtol=1e-4), n
            moved = max(moved, step_slow.abs().max().item())
    assert moved > 1e-5


def test_save_and_resume_restore_both_adapters(tmp_path):
    steady = ofs_trainer(tmp_path / "a", max_steps=4, training={"save_strategy": "steps", "save_steps": 2})
    steady.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert (checkpoint / FAST / "adapter_model.safetensors").is_file()
    assert (checkpoint / SLOW / "adapter_model.safetensors").is_file()
    resumed = ofs_trainer(tmp_path / "b", max_steps=4, training={"save_strategy": "steps", "save_steps": 2})
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = dict(policy(steady).named_parameters()), dict(policy(resumed).named_parameters())
    trained = [n for n in a if ".fast." in n or ".slow." in n]
    assert len(trained) == 16
    for n in trained:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
        assert b[n].requires_grad
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (steady, resumed)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], abs=1e-6)  # the history is resumed too
    steady.save_model()
    assert {p.name for p in (tmp_path / "a").iterdir() if (p / "adapter_config.json").is_file()} == {FAST, SLOW}


# -- COFS: adapter combination -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_adapters():
    from peft import get_peft_model

    from trl_plus.testing import build_model, build_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(build_model(build_tokenizer()).double(), lora(init_lora_weights=False), adapter_name="d1")
    model.add_adapter("d2", lora(init_lora_weights=False))
    model.add_adapter("d3", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_cofs_one_hot_is_that_adapter_and_cat_is_the_weighted_sum_of_delta_w(three_adapters):
    model = three_adapters
    for how in ("cat", "mean"):
        cofs(model, ["d1", "d2"], [0.0, 1.0], target="onehot", how=how)
        for layer in lora_layers(model):
            assert torch.allclose(layer.get_delta_weight("onehot"), layer.get_delta_weight("d2"), atol=1e-12)
    weights = [0.2, 0.5, 0.3]  # ranks 4, 4, 2 and two scalings: still Σ w·ΔW exactly
    combine(model, ["d1", "d2", "d3"], weights, "mix")
    for layer in lora_layers(model):
        expected = sum(w * layer.get_delta_weight(n) for n, w in zip(["d1", "d2", "d3"], weights))
        assert torch.allclose(layer.get_delta_weight("mix"), expected, atol=1e-12)
        assert layer.r["mix"] == 10
    combine(model, ["d1", "d2"], [0.3, 0.7], "linear", how="mean")  # per-tensor: not Σ w·ΔW
    layer = lora_layers(model)[0]
    assert not torch.allclose(layer.get_delta_weight("linear"),
                              0.3 * layer.get_delta_weight("d1") + 0.7 * layer.get_delta_weight("d2"), atol=1e-9)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n or ".linear." in n)


def test_cofs_card_example_is_the_per_tensor_combination(three_adapters):
    model = three_adapters
    layer = lora_layers(model)[0]
    with torch.no_grad():  # the card's flattened toy tensors: Θ1 = [1, 2], Θ2 = [3, −1] (first two entries of A)
        layer.lora_A["d1"].weight.view(-1)[:2] = torch.tensor([1.0, 2.0])
        layer.lora_A["d2"].weight.view(-1)[:2] = torch.tensor([3.0, -1.0])
    cofs(model, ["d1", "d2"], [0.3, 0.7], target="card", how="mean")
    assert layer.lora_A["card"].weight.view(-1)[:2].tolist() == pytest.approx([2.4, -0.1], abs=1e-12)
    with pytest.raises(TrlPlusError, match="simplex"):
        cofs(model, ["d1", "d2"], [0.5, 0.6])


# -- recipes, bad input ----------------------------------------------------------------------------------------------


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(ROOT / "recipes/ofs-dpo.yaml")
    assert {n: a.lr_scale for n, a in recipe.model.adapters.items()} == {FAST: 4.0, SLOW: 1.0}
    result = run_recipe_on_cpu("recipes/ofs-dpo.yaml", tmp_path)
    assert result.global_step == 2
    assert (tmp_path / FAST / "adapter_model.safetensors").is_file()
    assert (tmp_path / SLOW / "adapter_model.safetensors").is_file()
    assert result.metrics["ofs/loss_fast"] > 0


@pytest.mark.parametrize("adapters, message", [
    ({"fast": {"r": 4}}, "model.adapters: method 'ofs-dpo' trains the adapters fast, slow; the recipe has fast "
                         "(missing slow"),
    ({"fast": {"r": 4, "lr_scale": 0}, "slow": {"r": 4}}, "model.adapters.fast.lr_scale: Input should be greater "
                                                          "than 0"),
    ({"fast": {"r": 4, "lr_scale": -2.0}, "slow": {"r": 4}}, "model.adapters.fast.lr_scale"),
])  # fmt: skip
def test_bad_adapters_are_one_line_before_any_model_loads(tmp_path, monkeypatch, adapters, message):
    forbid_model_loading(monkeypatch)
    data = write_jsonl(preference_rows(4), tmp_path / "pairs.jsonl")
    recipe = {"method": "ofs-dpo", "model": {"name_or_path": "tiny-llama", "adapters": adapters},
              "data": {"train": {"path": data}}, "training": {"output_dir": str(tmp_path / "run")}}  # fmt: skip
    with pytest.raises(TrlPlusError) as error:
        check_recipe(load_recipe(recipe))
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(TrlPlusError, match="lora .one adapter. or adapters"):
        load_recipe({**recipe, "model": {"name_or_path": "tiny-llama", "lora": {"r": 4}, "adapters": {"fast": {}}}})
    with pytest.raises(TrlPlusError, match="model.adapters: method 'ofs-dpo' trains .* the recipe has none"):
        check_recipe(load_recipe({**recipe, "model": {"name_or_path": "tiny-llama", "lora": {"r": 4}}}))
