"""SFT-fdiv: the card's worked examples (losses and gradients of the four f-forms, the SFT baselines), the reductions
(reverse KL ≡ SFT's gradient, on hand-made tensors and through the real trainer), the experimental flag, and a tiny
run of the recipe where the log-ratio rises and the experimental weight shrinks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from trl_plus_sft_fdiv import SFTFDiv, f_score, f_weight

from trl_plus import SFT, PlusTrainer, check_recipe, load_recipe  # noqa: F401 (PlusTrainer: imported at collection)
from trl_plus.testing import make_context, preference_rows, tiny_trainer, train_tiny, training_logs

ROOT = Path(__file__).resolve().parents[3]
FORMS = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def method(f="reverse_kl", **kwargs):
    return SFTFDiv(f_divergence=f, experimental=f != "reverse_kl", **kwargs)


# The card's worked example (shared/methods/sft-fdiv.md): two demonstrations, sequence log-ratios ρ = [0.5, −0.2].
LOSSES = {"reverse_kl": -0.15, "forward_kl": -0.0860333, "js_divergence": -0.0570393, "alpha_divergence": -0.116028}
GRADIENTS = {"reverse_kl": [-0.5, -0.5], "forward_kl": [-0.303265, -0.610701], "js_divergence": [-0.18877, -0.274917]}


@pytest.mark.parametrize("granularity", ["token", "sequence", "sequence_mean"])  # one token each: all three agree
@pytest.mark.parametrize("form", FORMS)
def test_the_cards_worked_example(form, granularity):
    ctx = make_context([[[0.5], [-0.2]]], [[[0.0], [0.0]]])  # K = 1, B = 2
    out = method(form, granularity=granularity).loss(ctx)
    assert out.loss.item() == pytest.approx(LOSSES[form], abs=1e-6)
    if form in GRADIENTS:
        out.loss.backward()
        assert torch.allclose(ctx.token_logps.grad[0, :, 0], torch.tensor(GRADIENTS[form], dtype=torch.float64),
                              atol=1e-6, rtol=0)  # fmt: skip


def test_the_sft_baselines_of_the_card():
    # chosen token log-prob sums [−12, −20] over [10, 16] tokens, a reference of zeros
    policy = [[[-1.2] * 10, [-1.25] * 16]]
    ctx = make_context(policy, [[[0.0] * 10, [0.0] * 16]])
    assert method(granularity="token").loss(ctx).loss.item() == pytest.approx(1.230769, abs=1e-6)
    assert SFT().loss(make_context(policy)).loss.item() == pytest.approx(1.230769, abs=1e-6)
    assert method(granularity="sequence_mean").loss(ctx).loss.item() == pytest.approx(1.225, abs=1e-6)
    assert method(granularity="sequence").loss(ctx).loss.item() == pytest.approx(16.0, abs=1e-6)


def test_reverse_kl_has_exactly_the_sft_gradient_on_hand_made_tensors():
    generator = torch.Generator().manual_seed(0)
    lengths = [[3, 5, 2]]
    policy = [[(-torch.rand(n, generator=generator, dtype=torch.float64) * 3).tolist() for n in lengths[0]]]
    reference = [[(-torch.rand(n, generator=generator, dtype=torch.float64) * 3).tolist() for n in lengths[0]]]
    ours, sft = make_context(policy, reference), make_context(policy)
    method("reverse_kl").loss(ours).loss.backward()
    SFT().loss(sft).loss.backward()
    assert torch.allclose(ours.token_logps.grad, sft.token_logps.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("form", FORMS)
def test_zero_at_initialisation_increasing_and_anchored(form):
    rho = torch.linspace(-2, 3, 51, dtype=torch.float64)
    score, weight = f_score(rho, form), f_weight(rho, form)
    assert f_score(torch.zeros(1, dtype=torch.float64), form).item() == pytest.approx(0.0, abs=1e-15)
    assert bool((score[1:] > score[:-1]).all()) and bool((weight > 0).all())  # the loss falls as ρ rises
    autograd = torch.func.grad(lambda r: f_score(r, form).sum())(rho)
    assert torch.allclose(autograd, weight, atol=1e-12, rtol=0)  # f_weight is s_f′
    if form != "reverse_kl":  # bounded by SFT's gradient for ρ ≥ 0 and shrinking as ρ grows
        above = weight[rho >= 0]
        assert bool((above <= 1).all()) and bool((above[1:] < above[:-1]).all())


def test_the_inferred_forms_need_the_experimental_flag():
    with pytest.raises(ValidationError, match="experimental: true"):
        SFTFDiv(f_divergence="forward_kl")
    with pytest.raises(ValidationError, match="reverse_kl"):
        SFTFDiv(f_divergence="alpha_divergence", alpha=1.0, experimental=True)
    assert SFTFDiv.needs.reference == "yes" and SFTFDiv.sequences_per_example == 1


def test_reverse_kl_gradient_equals_sft_through_the_trainer(tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(6)]
    grads, losses = {}, {}
    for name in ("sft", "sft-fdiv"):
        trainer = tiny_trainer(name, tmp_path / name, rows=rows, training={"per_device_train_batch_size": 6})
        batch = trainer._prepare_inputs(trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(6)]))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert losses["sft-fdiv"] == pytest.approx(0.0, abs=1e-6)  # policy == reference: ρ = 0
    assert losses["sft"] > 1.0
    assert grads["sft"].keys() == grads["sft-fdiv"].keys() and grads["sft"]
    for name, grad in grads["sft"].items():
        assert torch.allclose(grads["sft-fdiv"][name], grad, atol=1e-6, rtol=0), name


def test_a_few_steps_raise_the_log_ratio_and_shrink_the_forward_kl_weight(tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(8)]
    trainer = train_tiny("sft-fdiv", tmp_path, method_args={"f_divergence": "forward_kl", "experimental": True},
                         rows=rows, max_steps=4, learning_rate=5e-3, training={"per_device_train_batch_size": 4})
    logs = training_logs(trainer)
    first, last = logs[0], logs[-1]
    assert first["sft_fdiv/log_ratio"] == pytest.approx(0.0, abs=1e-6) and first["loss"] == pytest.approx(0, abs=1e-6)
    assert last["sft_fdiv/log_ratio"] > 0.05  # the demonstrations rose above the reference ...
    assert last["sft_fdiv/weight"] < 1.0 and last["loss"] < 0  # ... and the forward-KL weight e^{−ρ} shrank
    assert last["sft/nll"] < first["sft/nll"]


def test_the_recipe_validates_as_written():
    recipe = load_recipe(ROOT / "recipes/sft-fdiv.yaml")
    check_recipe(recipe)
    assert recipe.method == "sft-fdiv" and recipe.method_args["experimental"] is True


def test_a_precomputed_reference_gives_the_live_references_curve(tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(4)]
    curves = {}
    for mode in ("precomputed", "model"):
        trainer = train_tiny("sft-fdiv", tmp_path / mode, method_args={"f_divergence": "js_divergence",
                             "experimental": True}, rows=rows, max_steps=2, reference_mode=mode,
                             training={"per_device_train_batch_size": 4})  # fmt: skip
        assert trainer.reference_mode == mode
        curves[mode] = [e[key] for e in training_logs(trainer) for key in ("loss", "sft_fdiv/log_ratio")]
    assert curves["precomputed"] == pytest.approx(curves["model"], abs=1e-6)
