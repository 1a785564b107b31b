"""MODPO: the card's worked example and special cases (w = (1,) ≡ DPO, equal margins ≡ DPO with β/w_0, init,
scaling invariance, the length margin), the margins' zero gradient, margin columns through the real trainer, real
steps that raise z, the shipped sample and recipe, and the one-line errors before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_modpo import MODPO

from trl_plus import DPO, TrlPlusError, load_recipe, train
from trl_plus.testing import (
    forbid_model_loading,
    make_context,
    perturb,
    preference_rows,
    run_recipe_on_cpu,
    tiny_trainer,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "recipes/data/modpo_sample.jsonl"

# The DPO card's two pairs as sequence sums: ρ_w = [1, −1], ρ_l = [−1, 0.5], Δ = [2, −1.5].
POLICY = [[[-12.0], [-20.0]], [[-15.0], [-18.0]]]
REFERENCE = [[[-13.0], [-19.0]], [[-14.0], [-18.5]]]


def margins(chosen, rejected, requires_grad=False):
    """A batch holding margin columns as the collator builds them (here float64 ``[B, M−1]``)."""
    c = torch.tensor(chosen, dtype=torch.float64, requires_grad=requires_grad)
    r = torch.tensor(rejected, dtype=torch.float64, requires_grad=requires_grad)
    return {"chosen_margin_rewards": c, "rejected_margin_rewards": r}


def card_context(chosen=((0.3,), (0.1,)), rejected=((-0.2,), (0.4,)), **kwargs):
    return make_context(POLICY, REFERENCE, batch=margins(chosen, rejected, **kwargs))


def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


def test_card_worked_example():
    method = MODPO(beta=0.1, w=(0.5, 0.5))
    ctx = card_context()
    z, _, beta_delta, offset = method.logits(ctx)
    assert z.tolist() == pytest.approx([-0.1, 0.0], abs=1e-12)  # [(0.2 − 0.25)/0.5, (−0.15 + 0.15)/0.5]
    assert beta_delta.tolist() == pytest.approx([0.2, -0.15], abs=1e-12)
    assert offset.tolist() == pytest.approx([0.25, -0.15], abs=1e-12)
    losses, _ = method.pair_losses(ctx)
    assert losses.tolist() == pytest.approx([0.744397, 0.693147], abs=1e-6)
    out = method.loss(ctx)
    assert out.loss.item() == pytest.approx(0.718772, abs=1e-6)
    # the logged rewards are r̂(y) = (β ρ(y) − w_1 r_1(y)) / w_0, so rewards/margins is z (the official trainer's)
    assert (out.rewards[0] - out.rewards[1]).tolist() == pytest.approx([-0.1, 0.0], abs=1e-12)
    assert out.rewards[:, 0].tolist() == pytest.approx([(0.1 - 0.15) / 0.5, (-0.1 + 0.1) / 0.5], abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_one_weight_is_dpo(loss_type):
    dpo = DPO(beta=0.1, loss_type=loss_type).loss(make_context(POLICY, REFERENCE))
    for ctx in (make_context(POLICY, REFERENCE), card_context(chosen=((), ()), rejected=((), ()))):
        ours = MODPO(beta=0.1, w=(1.0,), loss_type=loss_type).loss(ctx)
        assert ours.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)
        assert torch.allclose(ours.rewards, dpo.rewards, atol=1e-12)
    # w_0 = 1 and zero margin differences: DPO whatever w_1
    same = MODPO(beta=0.1, w=(1.0, 0.7), loss_type=loss_type).loss(card_context(rejected=((0.3,), (0.1,))))
    assert same.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)


def test_equal_margins_give_dpo_with_beta_over_w0():
    ours = MODPO(beta=0.1, w=(0.5, 0.5)).loss(card_context(rejected=((0.3,), (0.1,)))).loss.item()
    assert ours == pytest.approx(DPO(beta=0.2).loss(make_context(POLICY, REFERENCE)).loss.item(), abs=1e-12)
    hinge = MODPO(beta=0.1, w=(0.25, 2.0), loss_type="hinge").loss(card_context(rejected=((0.3,), (0.1,)))).loss
    assert hinge.item() == pytest.approx(DPO(beta=0.4, loss_type="hinge").loss(make_context(POLICY, REFERENCE)).loss.item(),
                                         abs=1e-12)  # fmt: skip


def test_at_init_z_is_minus_the_scaled_margin_and_log2_only_without_one():
    at_init = make_context(POLICY, POLICY, batch=margins(((0.3,), (0.1,)), ((-0.2,), (0.4,))))
    z = MODPO(beta=0.1, w=(0.5, 0.5)).logits(at_init)[0]
    assert z.tolist() == pytest.approx([-0.5 * 0.5 / 0.5, -0.5 * -0.3 / 0.5], abs=1e-12)  # −(1/w_0) w_1 Δr
    loss = MODPO(beta=0.1, w=(0.5, 0.5)).loss(at_init).loss.item()
    assert loss == pytest.approx((neg_log_sigmoid(-0.5) + neg_log_sigmoid(0.3)) / 2, abs=1e-12)
    assert abs(loss - math.log(2)) > 1e-3
    no_margin = make_context(POLICY, POLICY, batch=margins(((0.3,), (0.1,)), ((0.3,), (0.1,))))
    assert MODPO(beta=0.1, w=(0.5, 0.5)).loss(no_margin).loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_scaling_beta_and_all_weights_by_c_leaves_z():
    base = MODPO(beta=0.1, w=(0.5, 0.5, 0.25))
    ctx = card_context(chosen=((0.3, 1.0), (0.1, -2.0)), rejected=((-0.2, 0.5), (0.4, 0.0)))
    for c in (0.5, 3.0):
        scaled = MODPO(beta=0.1 * c, w=(0.5 * c, 0.5 * c, 0.25 * c))
        assert torch.allclose(scaled.logits(ctx)[0], base.logits(ctx)[0], atol=1e-12)
        assert scaled.loss(ctx).loss.item() == pytest.approx(base.loss(ctx).loss.item(), abs=1e-12)
    # 1/w_0 scales the whole logit: halving w_0 alone doubles z
    half = MODPO(beta=0.1, w=(0.25, 0.5, 0.25))
    assert torch.allclose(half.logits(ctx)[0], 2 * base.logits(ctx)[0], atol=1e-12)


def test_margins_have_no_gradient_and_the_logps_gradient_is_analytic():
    ctx = card_context(requires_grad=True)
    loss = MODPO(beta=0.1, w=(0.5, 0.5)).loss(ctx).loss
    columns = [ctx.batch["chosen_margin_rewards"], ctx.batch["rejected_margin_rewards"]]
    assert torch.autograd.grad(loss, columns, retain_graph=True, allow_unused=True) == (None, None)
    loss.backward()
    z = torch.tensor([-0.1, 0.0], dtype=torch.float64)
    expected = -torch.sigmoid(-z) * 0.1 / 0.5 / 2  # ∂L/∂ℓθ(y_w) = −σ(−z) β/w_0 / B
    assert torch.allclose(ctx.token_logps.grad[0, :, 0], expected, atol=1e-14)
    assert torch.allclose(ctx.token_logps.grad[1, :, 0], -expected, atol=1e-14)
    assert (ctx.token_logps.grad[0] < 0).all() and (ctx.token_logps.grad[1] > 0).all()


def test_length_margin_adds_w1_times_the_length_difference():
    # chosen 2 tokens, rejected 5 tokens (pair 1); 4 vs 1 (pair 2): r_1 = −|y|, z = βΔ + w_1(|y_w| − |y_l|) at w_0 = 1
    policy = [[[-6.0, -6.0], [-5.0] * 4], [[-3.0] * 5, [-18.0]]]
    reference = [[[-6.5, -6.5], [-4.75] * 4], [[-2.8] * 5, [-18.5]]]  # Δ = [2, −1.5] as on the card
    method = MODPO(beta=0.1, margin="length", w=(1.0, 0.1))
    z = method.logits(make_context(policy, reference))[0]
    assert z.tolist() == pytest.approx([0.2 + 0.1 * (2 - 5), -0.15 + 0.1 * (4 - 1)], abs=1e-12)
    with pytest.raises(ValidationError, match="two weights"):
        MODPO(margin="length", w=(1.0, 0.1, 0.2))


def test_config_errors():
    for bad in ({"w": (0.0, 1.0)}, {"w": (-1.0,)}, {"w": ()}, {"w": (1.0, float("nan"))}, {"loss_type": "ipo"},
                {"beta": 0.0}, {"weights": (1.0,)}):  # fmt: skip
        with pytest.raises(ValidationError):
            MODPO(**bad)


def margin_rows(n, chosen, rejected, seed=0):
    return [dict(r, chosen_margin_rewards=list(chosen), rejected_margin_rewards=list(rejected))
            for r in preference_rows(n, seed=seed)]  # fmt: skip


def recipe_with(tmp_path, rows, **method_args):
    data = write_jsonl(rows, tmp_path / "prefs.jsonl")
    recipe = {"method": "modpo", "method_args": method_args, "model": {"name_or_path": "tiny-llama"},
              "data": {"train": {"path": data}}, "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}  # fmt: skip
    path = tmp_path / "modpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    "rows, method_args, message",
    [
        (margin_rows(4, [0.1, 0.2], [0.0, 0.0]), {"w": [0.5, 0.5]},
         "row 1: column 'chosen_margin_rewards' has 2 margin reward(s) but method_args.w = [0.5, 0.5] has 2 weight(s): "
         "give len(w) − 1 = 1"),
        (margin_rows(4, [0.1], [0.0]), {"w": [1.0]}, "method_args.w = [1.0] has 1 weight(s): give len(w) − 1 = 0"),
        (preference_rows(4), {"w": [0.5, 0.5]}, "missing columns 'chosen_margin_rewards', 'rejected_margin_rewards': "
         "method_args.w = [0.5, 0.5] weighs 1 margin reward(s) per response"),
        (margin_rows(4, [0.1], [0.0, 0.3]), {"w": [0.5, 0.5]}, "column 'chosen_margin_rewards' has 1 values but "
         "'rejected_margin_rewards' has 2"),
        ([dict(r, chosen_margin_rewards=["high"], rejected_margin_rewards=[0.0]) for r in preference_rows(4)],
         {"w": [0.5, 0.5]}, "column 'chosen_margin_rewards' must be a list of numbers"),
        (margin_rows(4, [0.1], [0.0]), {"w": [0.0, 1.0]}, "method_args.w: w[0]"),
    ],
    ids=["length-vs-w", "w-one-with-margins", "missing-columns", "chosen-vs-rejected", "not-numbers", "w0-zero"],
)
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, monkeypatch, rows, method_args, message):
    forbid_model_loading(monkeypatch)
    path = recipe_with(tmp_path, rows, **method_args)
    with pytest.raises(TrlPlusError) as error:
        train(path)
    text = str(error.value)
    assert message in text and "\n" not in text and str(path) in text


def test_sample_file_is_valid_and_margins_are_hand_written():
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_margin_rewards", "rejected_margin_rewards"}
        assert len(row["chosen_margin_rewards"]) == len(row["rejected_margin_rewards"]) == 1
    assert MODPO.example_data["path"] == "recipes/data/modpo_sample.jsonl"


def _batch(trainer, rows):
    return trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(len(rows))])


def test_trainer_step_one_weight_and_equal_margins_are_dpo(tmp_path):
    rows = margin_rows(8, [0.3], [0.3])  # Δr = 0: the margin cancels
    trainers = {
        "dpo": tiny_trainer("dpo", tmp_path / "a", {"beta": 0.1}, rows=rows),
        "dpo-0.2": tiny_trainer("dpo", tmp_path / "b", {"beta": 0.2}, rows=rows),
        "modpo-1": tiny_trainer("modpo", tmp_path / "c", {"beta": 0.1, "w": [1.0]}, rows=preference_rows(8)),
        "modpo": tiny_trainer("modpo", tmp_path / "d", {"beta": 0.1, "w": [0.5, 0.5]}, rows=rows),
    }
    for t in trainers.values():
        perturb(t.model)  # the same noise for all: the policy leaves the reference
        t.model.eval()
    batch = _batch(trainers["modpo"], rows)
    assert batch["chosen_margin_rewards"].shape == (8, 1) and batch["chosen_margin_rewards_mask"].all()
    with torch.no_grad():
        loss = {name: t.compute_loss(t.model, dict(batch)).item() for name, t in trainers.items()}
    assert abs(loss["dpo"] - math.log(2)) > 1e-3
    assert loss["modpo-1"] == pytest.approx(loss["dpo"], abs=1e-6)  # w = (1,): DPO (no margin columns needed)
    assert loss["modpo"] == pytest.approx(loss["dpo-0.2"], abs=1e-6)  # Δr = 0: DPO with β / w_0


def test_real_steps_raise_z_and_the_columns_reach_the_loss(tmp_path):
    # Δr = r(y_w) − r(y_l) = 0.5 on every row: at init z = −w_1 Δr / w_0 = −0.5 exactly, then z grows
    rows = margin_rows(32, [0.2], [-0.3])
    trainer = tiny_trainer("modpo", tmp_path, {"beta": 0.1, "w": [0.5, 0.5]}, rows=rows, max_steps=8)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["rewards/margins"] == pytest.approx(-0.5, abs=1e-6)
    assert logs[0]["loss"] == pytest.approx(neg_log_sigmoid(-0.5), abs=1e-6)
    assert [e["modpo/margin_offset"] for e in logs] == pytest.approx([0.25] * len(logs), abs=1e-6)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["modpo/dpo_margin"] > logs[0]["modpo/dpo_margin"]


def test_recipe_validates_and_runs_on_the_sample_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/modpo.yaml").read_text())
    assert recipe["method"] == "modpo" and recipe["model"]["quantization"]["load_in_4bit"]
    assert load_recipe(ROOT / "recipes/modpo.yaml").method_args["w"] == [0.5, 0.5]
    result = run_recipe_on_cpu("recipes/modpo.yaml", tmp_path, "data.train.path=recipes/data/modpo_sample.jsonl")
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
