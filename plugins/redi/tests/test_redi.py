"""REDI: the card's worked example and special cases, the official `reinforce` loss, gradients, real steps, and
the two-stage recipe (SFT, adapter merge, REDI) on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_redi import REDI

from trl_plus import SFT, TrlPlusError
from trl_plus.testing import forbid_reference, make_context, run_recipe_on_cpu, train_tiny, training_logs

ROOT = Path(__file__).resolve().parents[3]


def spread(total, n):
    """``n`` equal per-token log-probs summing to ``total``."""
    return [total / n] * n


# Card worked example: pair 1 ℓ(y_w) = −12 over 10 tokens, ℓ(y_l) = −15 over 12; pair 2 −20 over 16, −18 over 8.
CARD = [[spread(-12, 10), spread(-20, 16)], [spread(-15, 12), spread(-18, 8)]]
NORMALIZED = [(-1.2, -1.25), (-1.25, -2.25)]  # (ℓ_w/|y_w|, ℓ_l/|y_l|) per pair


@pytest.mark.parametrize("alpha, per_pair, batch", [(0.8, [0.2, -0.55], -0.175), (1.0, [-0.05, -1.0], -0.525),
                                                    (0.0, [1.2, 1.25], 1.225)])  # fmt: skip
def test_card_worked_example(alpha, per_pair, batch):
    out = REDI(alpha=alpha).loss(make_context(CARD))
    assert out.loss.item() == pytest.approx(batch, abs=1e-12)  # negative values are expected: no lower bound
    for i, expected in enumerate(per_pair):
        assert REDI(alpha=alpha).loss(make_context([[s[i]] for s in CARD])).loss.item() == pytest.approx(
            expected, abs=1e-12
        )
    assert torch.allclose(out.rewards, torch.tensor(NORMALIZED, dtype=torch.float64).T, rtol=0, atol=1e-12)


def official_reinforce(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_coef=1.0,
                       rejected_coef=0.8, use_neg_weighting=False, gamma=1.0):  # fmt: skip
    """The official ``dpo2_trainer.py`` ``loss_type == "reinforce"`` branch, transcribed (then ``losses.mean()``)."""
    normalized_chosen = chosen_logps / torch.clamp(chosen_lengths, min=1.0)
    normalized_rejected = rejected_logps / torch.clamp(rejected_lengths, min=1.0)
    loss_chosen = -chosen_coef * normalized_chosen
    loss_rejected = rejected_coef * normalized_rejected
    if use_neg_weighting:
        loss_rejected = loss_rejected * torch.exp(gamma * normalized_rejected)
    return (loss_chosen + loss_rejected).mean()


@pytest.mark.parametrize("neg_weighting, gamma", [(False, 1.0), (True, 1.0), (True, 0.5)])
def test_matches_the_official_reinforce_loss_and_its_gradient(neg_weighting, gamma):
    torch.manual_seed(0)
    lengths = [[3, 7, 1, 12], [5, 2, 9, 4]]
    seqs = [[(-3 * torch.rand(n, dtype=torch.float64)).tolist() for n in side] for side in lengths]
    ctx = make_context(seqs)
    config = dict(alpha=0.6, chosen_coef=0.9, neg_weighting=neg_weighting, neg_weighting_gamma=gamma)
    out = REDI(**config).loss(ctx)
    sums = ctx.token_logps.detach().clone().requires_grad_(True)
    logps = (sums * ctx.mask).sum(-1)
    expected = official_reinforce(logps[0], logps[1], ctx.lengths[0], ctx.lengths[1], 0.9, 0.6, neg_weighting, gamma)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    out.loss.backward()
    expected.backward()
    assert torch.allclose(ctx.token_logps.grad, sums.grad, rtol=0, atol=1e-12)
    if neg_weighting:
        weights = torch.exp(gamma * ctx.mean_logps()[1].detach())
        assert out.metrics["redi/neg_weights"].item() == pytest.approx(weights.mean().item(), abs=1e-12)


def test_alpha_zero_is_sequence_mean_sft_on_the_chosen_responses():
    out = REDI(alpha=0.0).loss(make_context(CARD)).loss.item()
    assert out == pytest.approx((1.2 + 1.25) / 2, abs=1e-12)
    # and the core `sft` loss (a token mean over the batch) when the chosen responses have equal lengths
    equal_len = [[[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]], [[-3.0], [-4.0, -4.0]]]
    core = SFT().loss(make_context([equal_len[0]])).loss.item()
    assert REDI(alpha=0.0).loss(make_context(equal_len)).loss.item() == pytest.approx(core, abs=1e-12)


def test_duplicating_tokens_leaves_the_loss_unchanged():
    doubled = [[seq + seq for seq in side] for side in CARD]
    assert REDI().loss(make_context(doubled)).loss.item() == pytest.approx(
        REDI().loss(make_context(CARD)).loss.item(), abs=1e-12
    )


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
def test_gradients_are_constant_minus_one_and_plus_alpha_over_b(alpha):
    # linear in the normalised log-likelihoods: ∂L/∂(ℓ_w/|y_w|) = −1/B, ∂L/∂(ℓ_l/|y_l|) = +α/B, whatever the values
    for scale in (1.0, 100.0):
        ctx = make_context([[[v * scale for v in seq] for seq in side] for side in CARD])
        REDI(alpha=alpha).loss(ctx).loss.backward()
        g = ctx.token_logps.grad
        for i, (n_w, n_l) in enumerate(zip([10, 16], [12, 8])):
            assert g[0, i, :n_w].tolist() == pytest.approx([-1 / 2 / n_w] * n_w, rel=1e-12)
            assert g[1, i, :n_l].tolist() == pytest.approx([alpha / 2 / n_l] * n_l, rel=1e-12, abs=0)
        assert (g[0][ctx.mask[0] > 0] < 0).all()
        assert (g[1][ctx.mask[1] > 0] > 0).all() if alpha > 0 else (g[1] == 0).all()
        assert (g[ctx.mask == 0] == 0).all()


def test_config_validation():
    with pytest.raises(ValidationError):
        REDI(alpha=-0.1)
    with pytest.raises(ValidationError):
        REDI(reinforce_rejected_coef=0.8)  # the official name is `alpha` here: unknown keys are errors
    assert REDI().config.alpha == 0.8 and REDI().config.chosen_coef == 1.0 and not REDI().config.neg_weighting


def test_no_reference_and_a_few_steps_raise_the_margin(tmp_path, monkeypatch):
    forbid_reference(monkeypatch)
    trainer = train_tiny("redi", tmp_path, max_steps=8)
    assert trainer.ref_model is None and trainer.reference_mode == "none"
    logs = training_logs(trainer)
    assert len(logs) == 8
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/chosen"] > logs[0]["rewards/chosen"]
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_two_stage_recipes_run_on_cpu(tmp_path, monkeypatch):
    """Stage 1 (`sft` on the chosen traces), `trl-plus merge` as recipes/redi.yaml's header says, then stage 2 from
    the merged stage-1 model, which must differ from stage 2 started from the base model."""
    from trl_plus.testing import cli

    monkeypatch.chdir(ROOT)
    sft_recipe = yaml.safe_load((ROOT / "recipes/redi-sft.yaml").read_text())
    recipe = yaml.safe_load((ROOT / "recipes/redi.yaml").read_text())
    assert sft_recipe["method"] == "sft" and recipe["method"] == "redi"
    assert recipe["model"]["name_or_path"].startswith(sft_recipe["training"]["output_dir"])
    assert recipe["model"]["quantization"]["load_in_4bit"] and sft_recipe["model"]["quantization"]["load_in_4bit"]

    stage1 = run_recipe_on_cpu("recipes/redi-sft.yaml", tmp_path / "sft", "data.train.columns.completion=chosen",
                               "training.learning_rate=0.05", "training.warmup_steps=0")  # fmt: skip
    assert stage1.global_step == 2 and (tmp_path / "sft/adapter_model.safetensors").exists()
    assert cli("merge", str(tmp_path / "sft")) == 0
    merged = tmp_path / "sft-merged"
    with pytest.raises(TrlPlusError, match=r"holds a LoRA adapter, not a model; merge it into its base first"):
        run_recipe_on_cpu("recipes/redi.yaml", tmp_path / "unmerged", f"model.name_or_path={tmp_path / 'sft'}")

    from_base = run_recipe_on_cpu("recipes/redi.yaml", tmp_path / "base")
    from_sft = run_recipe_on_cpu("recipes/redi.yaml", tmp_path / "redi", f"model.name_or_path={merged}")
    for result, out in ((from_base, "base"), (from_sft, "redi")):
        assert result.global_step == 2 and (tmp_path / out / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "redi/trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
    assert abs(from_sft.metrics["logps/chosen"] - from_base.metrics["logps/chosen"]) > 1.0  # stage 1 carried over


# The official pipeline's length filter (experiments_trl/data_preprocess/study_length_distribution.py, dataset
# ..._filtered_P800_R19000) and window (redi_1_08_1e-6/config.yaml: max_prompt_length 800, max_length 19800).
OFFICIAL_PROMPT, OFFICIAL_RESPONSE = 800, 19_000


@pytest.mark.parametrize("name", ["redi-sft", "redi"])
def test_recipe_windows_hold_the_official_filtered_lengths(name):
    """A pair at the official filter's limits goes through the recipe's window whole: the same full prompt on both
    sides, every response token scored, the EOS last (no keep_end/keep_start cut)."""
    from trl_plus import load_recipe, method_collator

    recipe = load_recipe(ROOT / f"recipes/{name}.yaml")
    max_length = recipe.training["max_length"]
    assert max_length >= OFFICIAL_PROMPT + OFFICIAL_RESPONSE
    eos, pad = 2, 0
    prompt = [5 + i % 7 for i in range(OFFICIAL_PROMPT)]
    longest, shorter = [9] * (OFFICIAL_RESPONSE - 1) + [eos], [8] * 12_344 + [eos]  # EOS counted in the 19,000
    if recipe.method == "sft":
        method, example, sides = SFT(), {"prompt_ids": prompt, "completion_ids": longest}, [longest]
    else:
        method, example = REDI(), {"prompt_ids": prompt, "chosen_ids": longest, "rejected_ids": shorter}
        sides = [longest, shorter]
    batch = method_collator(method, pad, max_length, recipe.training.get("truncation_mode", "keep_start"))([example])
    assert batch["input_ids"].shape[0] == len(sides)
    for row, response in enumerate(sides):
        n = len(prompt) + len(response)
        assert batch["input_ids"][row, :n].tolist() == prompt + response
        assert batch["completion_mask"][row].sum().item() == len(response)
        assert batch["attention_mask"][row].sum().item() == n
