"""IS-DAA: the card's worked example, the weight's clip and stop-gradient, behaviour columns (with and without,
through the real trainer), equality with the base loss, real steps, the recipe, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_is_daa import ISDAA, importance_weights

from trl_plus import DPO
from trl_plus.testing import make_context, perturb, preference_rows, run_recipe_on_cpu, tiny_trainer, train_tiny

ROOT = Path(__file__).resolve().parents[3]

# The DPO card's two pairs as sequence sums: ρ_w = [1, −1], ρ_l = [−1, 0.5], Δ = [2, −1.5].
POLICY = [[[-12.0], [-20.0]], [[-15.0], [-18.0]]]
REFERENCE = [[[-13.0], [-19.0]], [[-14.0], [-18.5]]]


def card_context(**kwargs):
    """Both pairs of the card (π_data = π_ref unless ``batch`` carries behaviour columns)."""
    return make_context(POLICY, REFERENCE, **kwargs)


def behaviour(chosen, rejected):
    """A batch holding behaviour-policy columns as the collator builds them (float32 tensors)."""
    return {"chosen_logps": torch.tensor(chosen), "rejected_logps": torch.tensor(rejected)}


def test_card_worked_example():
    weights, log_weight = importance_weights(card_context(), eps=0.25)
    assert log_weight.tolist() == pytest.approx([0.0, -0.5], abs=1e-12)
    assert weights.tolist() == pytest.approx([1.0, 0.606531], abs=1e-6)
    is_dpo = ISDAA(beta=0.1, eps=0.25).loss(card_context())
    assert is_dpo.loss.item() == pytest.approx(0.532874, abs=1e-6)
    assert is_dpo.metrics["is_daa/base_loss"].item() == pytest.approx(0.684548, abs=1e-6)  # DPO alone
    is_ipo = ISDAA(beta=0.1, eps=0.25, loss_type="ipo").loss(card_context())
    assert is_ipo.loss.item() == pytest.approx(17.313, abs=5e-4)  # the card's precision
    assert is_ipo.loss.item() == pytest.approx((9.0 + 42.25 * math.exp(-0.5)) / 2, abs=1e-12)  # (Δ − 5)² = 9, 42.25
    assert is_ipo.metrics["is_daa/base_loss"].item() == pytest.approx(25.625, abs=1e-12)  # IPO alone



def test_paper_is_arxiv_2506_08681():
    """Nguyen et al., NeurIPS 2025: arXiv 2506.08681 (the official repository's badge links 2502.03029, another id);
    the plugin, its README and the top-level methods table name the same id."""
    assert ISDAA.paper.arxiv == "2506.08681" and ISDAA.paper.code == "mail-research/AIS-Sampling4DAAs"
    assert ISDAA.paper.title.startswith("Mitigating Reward Over-optimization in Direct Alignment Algorithms")
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `is-daa` |"))
    assert "arXiv 2506.08681" in row and "2502.03029" not in row
    assert "arxiv.org/abs/2506.08681" in (ROOT / "plugins/is-daa/README.md").read_text()


def test_cap_is_exp_two_eps_and_there_is_no_lower_clip():
    # log-weight 1.2 (policy above the data on both responses) is capped at 2ε = 0.5
    ctx = make_context([[[-12.0]], [[-15.0]]], [[[-12.6]], [[-15.6]]])
    weights, log_weight = importance_weights(ctx, eps=0.25)
    assert log_weight.item() == pytest.approx(1.2, abs=1e-12) and weights.item() == pytest.approx(1.64872, abs=1e-5)
    assert ISDAA(eps=0.25).loss(ctx).metrics["is_daa/clipped"].item() == 1.0
    low = make_context([[[-40.0]], [[-45.0]]], [[[-12.0]], [[-15.0]]])
    assert 0 < importance_weights(low, eps=0.25)[0].item() == pytest.approx(math.exp(-58), rel=1e-12)


def test_raising_both_responses_by_c_multiplies_w_by_exp_2c_and_leaves_delta():
    c = 0.1
    shifted = [[[-12.0 + c], [-20.0 + c]], [[-15.0 + c], [-18.0 + c]]]
    base = importance_weights(card_context(), 1.0)[0]
    moved = importance_weights(make_context(shifted, REFERENCE), 1.0)[0]
    assert (moved / base).tolist() == pytest.approx([math.exp(2 * c)] * 2, rel=1e-12)
    out = ISDAA(eps=1.0).loss(make_context(shifted, REFERENCE))
    assert out.metrics["is_daa/base_loss"].item() == pytest.approx(0.684548, abs=1e-6)  # Δ unchanged


@pytest.mark.parametrize("loss_type, at_init", [("sigmoid", math.log(2)), ("ipo", 1 / (4 * 0.1**2))])
def test_at_init_weight_one_and_base_loss(loss_type, at_init):
    out = ISDAA(beta=0.1, loss_type=loss_type).loss(make_context(POLICY, POLICY))
    assert out.metrics["is_daa/weight"].item() == 1.0
    assert out.loss.item() == pytest.approx(at_init, abs=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_weight_one_is_the_core_dpo_loss(loss_type):
    # ε = 0 and a policy above the data (here: behaviour = −1e4) → w = min(ratio, 1) = 1: the base loss exactly
    dpo = DPO(beta=0.1, loss_type=loss_type, ipo_normalize_by_length=False).loss(card_context())
    ctx = card_context(batch=behaviour([-1e4, -1e4], [-1e4, -1e4]))
    ours = ISDAA(beta=0.1, eps=0.0, loss_type=loss_type).loss(ctx)
    assert ours.metrics["is_daa/weight"].item() == 1.0
    assert ours.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)
    # behaviour = policy: log w = 0 for any ε
    ctx = card_context(batch=behaviour([-12.0, -20.0], [-15.0, -18.0]))
    as_policy = ISDAA(beta=0.1, eps=0.25, loss_type=loss_type).loss(ctx).loss.item()
    assert as_policy == pytest.approx(dpo.loss.item(), abs=1e-12)
    # TRL's length-normalised IPO also available as the base loss
    if loss_type == "ipo":
        ctx = card_context(batch=behaviour([-1e4, -1e4], [-1e4, -1e4]))
        normalised = ISDAA(eps=0.0, loss_type="ipo", ipo_normalize_by_length=True).loss(ctx).loss.item()
        assert normalised == pytest.approx(DPO(loss_type="ipo").loss(card_context()).loss.item(), abs=1e-12)


def test_behaviour_columns_equal_to_the_reference_change_nothing():
    without = ISDAA(eps=0.25).loss(card_context()).loss.item()
    same = ISDAA(eps=0.25).loss(card_context(batch=behaviour([-13.0, -19.0], [-14.0, -18.5]))).loss.item()
    other = ISDAA(eps=0.25).loss(card_context(batch=behaviour([-12.5, -19.0], [-14.0, -18.5]))).loss.item()
    assert same == pytest.approx(without, abs=1e-12) and abs(other - without) > 1e-3


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_weight_has_no_gradient(loss_type):
    ours, dpo = card_context(), card_context()
    ISDAA(beta=0.1, eps=0.25, loss_type=loss_type).loss(ours).loss.backward()
    base = DPO(beta=0.1, loss_type=loss_type, ipo_normalize_by_length=False).loss(dpo)
    base.loss.backward()
    weights = torch.tensor([1.0, math.exp(-0.5)], dtype=torch.float64)
    # ∂L/∂ℓθ = w_i · ∂L_DAA,i/∂ℓθ / B (the base's batch-mean gradient times w): no term from differentiating w
    assert torch.allclose(ours.token_logps.grad[:, :, 0], dpo.token_logps.grad[:, :, 0] * weights, atol=1e-14)
    g = ours.token_logps.grad[:, :, 0]
    assert (g[0] < 0).all() and (g[1] > 0).all()  # push chosen up, rejected down
    if loss_type == "sigmoid":
        assert g[0].tolist() == pytest.approx([-0.0225083, -0.0268715 * math.exp(-0.5)], abs=1e-7)  # DPO card


def test_clear_errors():
    with pytest.raises(ValidationError):
        ISDAA(loss_type="hinge")
    with pytest.raises(ValidationError):
        ISDAA(eps=-0.1)
    with pytest.raises(ValidationError):
        ISDAA(epsilon=0.25)
    with pytest.raises(ValueError, match="rejected_logps"):
        ISDAA().loss(card_context(batch={"chosen_logps": torch.tensor([-1.0, -1.0])}))
    with pytest.raises(RuntimeError, match="reference"):
        ISDAA().loss(make_context(POLICY))


def test_trainer_step_with_and_without_behaviour_columns(tmp_path):
    def trainer(method, **method_args):
        return tiny_trainer(method, tmp_path, method_args, rows=preference_rows(8))

    dpo, is_dpo = trainer("dpo", beta=0.1), trainer("is-daa", beta=0.1, eps=0.25)
    for t in (dpo, is_dpo):
        perturb(t.model)  # the same noise for all: the policy leaves the reference
        t.model.eval()
    examples = [dpo.train_dataset[i] for i in range(8)]
    batch = dpo.data_collator([dict(e) for e in examples])
    assert "chosen_logps" not in batch  # absent columns: absent from the batch
    with torch.no_grad():
        base = dpo.compute_loss(dpo.model, batch).item()
        without = is_dpo.compute_loss(is_dpo.model, batch).item()
        policy = dpo.frozen_token_logps(dpo.model, batch)  # [K*B, T] the perturbed policy's own log-probs
        sums = (policy * batch["completion_mask"][:, 1:]).sum(-1).view(2, -1)
    assert abs(base - math.log(2)) > 1e-3 and abs(without - base) > 1e-4  # the weights are not all 1
    assert is_dpo._metrics["eval"]["is_daa/weight"][-1] != pytest.approx(1.0, abs=1e-3)

    def with_columns(chosen, rejected):
        rows = [dict(e, chosen_logps=float(c), rejected_logps=float(r)) for e, c, r in zip(examples, chosen, rejected)]
        batch = is_dpo.data_collator(rows)  # the is-daa collator collates the optional columns
        assert batch["chosen_logps"].tolist() == pytest.approx(list(chosen)) and "rejected_logps" in batch
        return batch

    with torch.no_grad():
        as_policy = is_dpo.compute_loss(is_dpo.model, with_columns(sums[0].tolist(), sums[1].tolist())).item()
        is_dpo.method = ISDAA(beta=0.1, eps=0.0)  # the same trainer and weights, ε = 0
        clipped_to_one = is_dpo.compute_loss(is_dpo.model, with_columns([-1e4] * 8, [-1e4] * 8)).item()
    assert as_policy == pytest.approx(base, abs=1e-5)  # behaviour = policy: w = 1
    assert clipped_to_one == pytest.approx(base, abs=1e-6)  # ε = 0, policy far above the data: w = 1


def test_a_few_steps_raise_the_margin_and_columns_survive_column_pruning(tmp_path):
    # behaviour log-probs far below the policy's: every pair's weight is capped at e^{2ε}, which shows the optional
    # columns reached the loss through TRL's column pruning and the real dataloader
    rows = [dict(r, chosen_logps=-1e4, rejected_logps=-1e4) for r in preference_rows(32)]
    trainer = train_tiny("is-daa", tmp_path, method_args={"eps": 0.25}, rows=rows, max_steps=8)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["is_daa/weight"] for e in logs] == pytest.approx([math.exp(0.5)] * len(logs), rel=1e-6)
    assert logs[0]["loss"] == pytest.approx(math.exp(0.5) * math.log(2), rel=1e-6)  # policy == reference: e^{2ε}·log 2
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/is-daa.yaml").read_text())
    assert recipe["method"] == "is-daa" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/is-daa.yaml", tmp_path)
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
