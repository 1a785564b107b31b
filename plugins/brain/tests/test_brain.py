"""BRAIn: the card's worked example and gradient, the softmax invariances, log q not cancelling, the argmax limit and
its DPO reduction (by hand and through the trainer), variable K through the real collator and trainer (same loss
alone and in a mixed batch, Σ K_b rows forwarded), real steps, the recipe, bad input before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_brain import BRAIn, log_weights

from trl_plus import DPO, TrlPlusError
from trl_plus.testing import (
    forbid_model_loading,
    make_context,
    perturb,
    preference_rows,
    run_recipe_on_cpu,
    tiny_trainer,
    train_tiny,
    training_logs,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "recipes/data/brain_sample.jsonl"

# The card's worked example: one prompt, K = 4, τ = 1, q = p_prior = the reference.
REF = [-10.0, -12.0, -11.0, -9.0]
RATIO = [0.1, -0.2, 0.0, 0.3]
REWARDS = [1.0, 0.0, -1.0, 2.0]
ALPHA = [0.236883, 0.087144, 0.032059, 0.643914]
BETA = [0.258594, 0.191572, 0.233986, 0.315848]


def context(policy, ref=None, rewards=None, seq_mask=None, **columns):
    """A ``[K, B]`` sequence-level context from ``policy[k][b]`` sums (``None``: no k-th sample of prompt b); list
    columns are given per prompt (``rewards[b][k]``), as the collator's ``[B, L]``."""
    def tokens(values):
        return [[[] if v is None else [v] for v in row] for row in values]

    batch = {name: torch.tensor(v, dtype=torch.float64) for name, v in {"rewards": rewards, **columns}.items()
             if v is not None}  # fmt: skip
    if seq_mask is None and any(v is None for row in policy for v in row):
        seq_mask = torch.tensor([[v is not None for v in row] for row in policy], dtype=torch.float64)
    return make_context(tokens(policy), None if ref is None else tokens(ref), batch=batch, seq_mask=seq_mask)


def card_context(**kwargs):
    return context([[r + d] for r, d in zip(REF, RATIO)], [[r] for r in REF], [REWARDS], **kwargs)


def test_card_worked_example():
    ctx = card_context()
    alpha, log_beta, *_ = log_weights(ctx, tau=1.0)
    assert alpha[:, 0].tolist() == pytest.approx(ALPHA, abs=1e-6)
    assert log_beta[:, 0].exp().tolist() == pytest.approx(BETA, abs=1e-6)
    out = BRAIn(tau=1.0).loss(ctx)
    assert out.loss.item() == pytest.approx(1.25306, abs=5e-6)  # the card's precision
    assert out.metrics["brain/kl"].item() == pytest.approx(0.305523, abs=1e-6)  # the self-normalised KL part
    entropy = -(alpha * alpha.log()).sum().item()
    assert out.loss.item() == pytest.approx(out.metrics["brain/kl"].item() + entropy, abs=1e-12)  # L = KL + H(α̂)
    out.loss.backward()
    grad = ctx.token_logps.grad[:, 0, 0]
    assert grad.tolist() == pytest.approx([0.021712, 0.104427, 0.201927, -0.328066], abs=1e-6)
    assert torch.allclose(grad, -(alpha[:, 0] - log_beta[:, 0].exp()).detach(), atol=1e-15)  # −(α̂ − β̂), nothing else
    # what a user sees: the policy's weight on the best-reward sample (y_4) vs the target's, best vs worst log-ratio
    assert out.metrics["brain/best_weight"].item() == pytest.approx(BETA[3], abs=1e-6)
    assert out.metrics["brain/target_best_weight"].item() == pytest.approx(ALPHA[3], abs=1e-6)
    assert out.rewards[:, 0].tolist() == pytest.approx([0.3, 0.0], abs=1e-12)  # ρ(y_4) (best), ρ(y_3) (worst)
    assert out.metrics["brain/margin"].item() == pytest.approx(sum(a * r for a, r in zip(ALPHA, RATIO)) - 0.05,
                                                               abs=1e-6)  # fmt: skip


def test_gradient_is_minus_alpha_minus_beta_per_prompt_over_a_ragged_batch():
    """∂L/∂ℓθ(y_k) = −(α̂_k − β̂_k)/B for every real sample, 0 for padded slots; α̂ gets no gradient."""
    policy = [[-5.0, -4.0, -6.5], [-7.0, -8.0, -3.0], [-6.0, -3.5, None], [-4.5, None, None]]  # [K=4][B=3]
    shift = [[0.3, -0.1, 0.2], [-0.4, 0.5, 0.1], [0.2, -0.3, None], [0.6, None, None]]
    ref = [[None if v is None else v - d for v, d in zip(row, drow)] for row, drow in zip(policy, shift)]
    rewards = [[0.5, 1.5, 0.7, 2.0], [-1.0, 0.0, 0.4, 0.0], [0.3, -0.3, 0.0, 0.0]]  # [B][L] (pad values 0)
    ctx = context(policy, ref, rewards)
    ctx.batch["rewards"].requires_grad_(True)
    out = BRAIn(tau=0.7).loss(ctx)
    out.loss.backward()
    alpha, log_beta, real, *_ = log_weights(ctx, tau=0.7)
    assert ctx.batch["rewards"].grad is None  # α̂ is a constant
    expected = -(alpha - log_beta.exp()).detach() / 3
    assert torch.allclose(ctx.token_logps.grad[..., 0], expected.masked_fill(~real, 0), atol=1e-15)
    assert (alpha[~real] == 0).all() and (log_beta[~real] == float("-inf")).all()
    padded = [[v if k < n else 1e9 for k, v in enumerate(row)] for row, n in zip(rewards, (4, 3, 2))]
    assert BRAIn(tau=0.7).loss(context(policy, ref, padded)).loss.item() == out.loss.item()  # pads never count


def test_softmax_invariances_and_permutation():
    base = BRAIn(tau=0.5).loss(card_context()).loss.item()
    shifted_rewards = [[r + 3.0 for r in REWARDS]]
    policy = [[r + d] for r, d in zip(REF, RATIO)]
    same = BRAIn(tau=0.5).loss(context(policy, [[r] for r in REF], shifted_rewards)).loss.item()
    assert same == pytest.approx(base, abs=1e-12)  # a per-prompt reward baseline is automatic
    lifted = [[r + d + 2.0] for r, d in zip(REF, RATIO)]  # every ℓθ of the prompt + c
    assert BRAIn(tau=0.5).loss(context(lifted, [[r] for r in REF], [REWARDS])).loss.item() == pytest.approx(base,
                                                                                                          abs=1e-12)
    order = [2, 0, 3, 1]
    permuted = context([policy[k] for k in order], [[REF[k]] for k in order], [[REWARDS[k] for k in order]])
    assert BRAIn(tau=0.5).loss(permuted).loss.item() == pytest.approx(base, abs=1e-12)
    # changing r changes only α̂: β̂ is the same
    other = context(policy, [[r] for r in REF], [[0.0, 5.0, 1.0, -2.0]])
    assert torch.equal(log_weights(other, 0.5)[1], log_weights(card_context(), 0.5)[1])
    assert not torch.allclose(log_weights(other, 0.5)[0], log_weights(card_context(), 0.5)[0])


def test_equal_rewards_and_policy_equal_prior_is_the_optimum():
    ctx = context([[r] for r in REF], [[r] for r in REF], [[0.7] * 4])
    out = BRAIn().loss(ctx)
    assert out.loss.item() == pytest.approx(math.log(4), abs=1e-12)  # α̂ = β̂ = uniform
    out.loss.backward()
    assert torch.count_nonzero(ctx.token_logps.grad) == 0


def test_log_q_does_not_cancel_in_beta():
    """Samples from a proposal q ≠ p_prior (column ``proposal_logps``), rewards all equal: the posterior is the prior,
    so a policy equal to the prior is optimal whatever q: α̂ = β̂ = softmax(ℓ_prior − log q), loss H(α̂), zero gradient.
    If log q cancelled in β̂ (β̂ = softmax(ℓθ)), the gradient would not vanish (asserted on the cancelled form)."""
    q = [[-10.5, -11.0, -11.5, -8.0]]
    ctx = context([[r] for r in REF], [[r] for r in REF], [[0.0] * 4], proposal_logps=q)
    alpha, log_beta, *_ = log_weights(ctx, tau=1.0)
    target = torch.softmax(torch.tensor(REF, dtype=torch.float64) - torch.tensor(q[0], dtype=torch.float64), 0)
    assert torch.allclose(alpha[:, 0], target, atol=1e-15) and torch.allclose(log_beta.exp()[:, 0], target, atol=1e-15)
    out = BRAIn().loss(ctx)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-(target * target.log()).sum().item(), abs=1e-12)
    assert ctx.token_logps.grad.abs().max().item() < 1e-15
    cancelled = -(alpha[:, 0] - torch.softmax(ctx.logps()[:, 0].detach(), 0))  # the gradient if log q cancelled
    assert cancelled.abs().max().item() > 0.1
    # with rewards, q enters α̂ and β̂ with the same sign: the card's formula, by hand
    ctx = context([[r + d] for r, d in zip(REF, RATIO)], [[r] for r in REF], [REWARDS], proposal_logps=q)
    policy = torch.tensor([r + d for r, d in zip(REF, RATIO)], dtype=torch.float64)
    logq, prior = torch.tensor(q[0], dtype=torch.float64), torch.tensor(REF, dtype=torch.float64)
    by_hand = -(torch.softmax(prior + torch.tensor(REWARDS, dtype=torch.float64) - logq, 0)
                * torch.log_softmax(policy - logq, 0)).sum()  # fmt: skip
    assert BRAIn().loss(ctx).loss.item() == pytest.approx(by_hand.item(), abs=1e-12)
    assert abs(by_hand.item() - BRAIn().loss(card_context()).loss.item()) > 0.1  # q ≠ the reference matters


def test_prior_column_enters_alpha_only_and_both_columns_need_no_reference():
    prior = [[-9.0, -12.5, -10.0, -9.5]]
    ctx = context([[r + d] for r, d in zip(REF, RATIO)], [[r] for r in REF], [REWARDS], prior_logps=prior)
    alpha, log_beta, *_ = log_weights(ctx, 1.0)
    ref = torch.tensor(REF, dtype=torch.float64)
    expected = torch.softmax(torch.tensor(prior[0], dtype=torch.float64) + torch.tensor(REWARDS).double() - ref, 0)
    assert torch.allclose(alpha[:, 0], expected, atol=1e-15)  # q = the reference
    assert log_beta.exp()[:, 0].tolist() == pytest.approx(BETA, abs=1e-6)  # β̂ unchanged: the prior is not in it
    # both columns given: the reference is not used (reference.mode: none works)
    both = context([[r + d] for r, d in zip(REF, RATIO)], None, [REWARDS], prior_logps=[REF], proposal_logps=[REF])
    assert BRAIn().loss(both).loss.item() == pytest.approx(1.25306, abs=5e-6)
    with pytest.raises(TrlPlusError, match=r"no reference and no 'proposal_logps' column"):
        BRAIn().loss(context([[r] for r in REF], None, [REWARDS], prior_logps=[REF]))


def test_tau_zero_is_the_argmax_limit_and_k2_is_dpo_beta_1():
    limit = BRAIn(tau=0).loss(card_context())
    alpha = log_weights(card_context(), 0.0)[0][:, 0]
    assert alpha.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert limit.loss.item() == pytest.approx(-math.log(BETA[3]), abs=1e-6)
    # a small τ is the same to the last bit once exp(−gap/τ) underflows (gap 1, τ = 1e-3: e^-1000 = 0 in float64)
    assert BRAIn(tau=1e-3).loss(card_context()).loss.item() == limit.loss.item()
    # ties at the top: α̂ shares the mass by p_prior/q among them (here q = p_prior: equally)
    tied = context([[r] for r in REF], [[r] for r in REF], [[2.0, 0.0, 2.0, 1.0]])
    assert log_weights(tied, 0.0)[0][:, 0].tolist() == [0.5, 0.0, 0.5, 0.0]
    # K = 2, best first: −log σ((ℓθ − ℓref)(y_w) − (ℓθ − ℓref)(y_l)) = DPO with β = 1, both prompts of the DPO card
    policy, ref = [[-12.0, -20.0], [-15.0, -18.0]], [[-13.0, -19.0], [-14.0, -18.5]]
    dpo = DPO(beta=1.0).loss(make_context([[[v] for v in row] for row in policy], [[[v] for v in row] for row in ref]))
    ours = BRAIn(tau=0).loss(context(policy, ref, [[1.0, 0.0], [0.3, -0.4]]))
    assert ours.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)
    assert torch.allclose(ours.rewards, dpo.rewards, atol=1e-12)  # rewards/* are DPO's (β = 1)
    swapped = BRAIn(tau=0).loss(context(policy[::-1], ref[::-1], [[0.0, 1.0], [-0.4, 0.3]]))  # best second
    assert swapped.loss.item() == pytest.approx(dpo.loss.item(), abs=1e-12)


@pytest.fixture(scope="module")
def sample_rows():
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def test_sample_file(sample_rows):
    assert len(sample_rows) == 12
    assert {len(r["completions"]) for r in sample_rows} == {2, 3, 4}
    assert all(len(r["rewards"]) == len(r["completions"]) for r in sample_rows)


def test_dpo_reduction_through_the_trainer(tmp_path):
    """K = 2 pairs as BRAIn rows (τ = 0, best first or second) vs the same pairs through the core ``dpo`` (β = 1):
    the same loss (1e-6) and gradients on a perturbed tiny model."""
    pairs = preference_rows(6)
    rows = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "rewards": [1.0, 0.0]} for r in pairs]
    rows[1] = {**rows[1], "completions": rows[1]["completions"][::-1], "rewards": [-2.0, 0.5]}  # best second
    dpo = tiny_trainer("dpo", tmp_path / "dpo", {"beta": 1.0}, rows=pairs)
    ours = tiny_trainer("brain", tmp_path / "brain", {"tau": 0.0}, rows=rows)
    results = []
    for t in (dpo, ours):
        perturb(t.model)
        t.model.eval()
        batch = t.data_collator([dict(t.train_dataset[i]) for i in range(6)])
        loss = t.compute_loss(t.model, batch)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in t.model.parameters() if p.grad is not None])))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6) and abs(results[0][0] - math.log(2)) > 1e-3
    assert torch.allclose(results[1][1], results[0][1], atol=1e-6)


def forward_spy(model):
    """Wrap ``model.forward``: the returned list gets each call's number of rows."""
    rows, forward = [], model.forward

    def spy(*args, **kwargs):
        rows.append(kwargs["input_ids"].size(0))
        return forward(*args, **kwargs)

    model.forward = spy
    return rows


def test_variable_k_same_loss_alone_and_in_a_mixed_batch(tmp_path, sample_rows):
    """Rows of 4, 2 and 3 completions (K_max = 4) through the real collator and ``compute_loss``: each prompt's loss
    equals its loss in a batch of it alone (1e-6), and the policy and the reference each see exactly Σ K_b = 9 rows."""
    rows = [sample_rows[2], sample_rows[1], sample_rows[0]]  # 4, 2, 3 completions
    trainer = tiny_trainer("brain", tmp_path, rows=rows, reference_mode="model")
    perturb(trainer.model)
    trainer.model.eval()
    trainer.model.double(), trainer.ref_model.double()  # float64: padding changes float32 kernel sums by ~1e-6
    policy_rows, ref_rows = forward_spy(trainer.model), forward_spy(trainer.ref_model)
    captured, prompt_losses = [], trainer.method.prompt_losses
    trainer.method.prompt_losses = lambda ctx: captured.append(prompt_losses(ctx)[0].detach()) or prompt_losses(ctx)
    examples = [dict(trainer.train_dataset[i]) for i in range(3)]
    batch = trainer.data_collator([dict(e) for e in examples])
    assert batch["seq_mask"].tolist() == [[True] * 3, [True] * 3, [True, False, True], [True, False, False]]
    assert batch["input_ids"].size(0) == 9 and batch["sequence_slots"].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    with torch.no_grad():
        mixed = trainer.compute_loss(trainer.model, batch).item()
        assert policy_rows == [9] and ref_rows == [9]
        alone = [trainer.compute_loss(trainer.model, trainer.data_collator([dict(e)])).item() for e in examples]
    assert policy_rows == [9, 4, 2, 3] and ref_rows == [9, 4, 2, 3]
    per_prompt = captured[0].tolist()
    assert per_prompt[1] == pytest.approx(alone[1], abs=1e-6)  # the prompt with 2 of K_max = 4 completions
    assert per_prompt == pytest.approx(alone, abs=1e-6) and mixed == pytest.approx(sum(alone) / 3, abs=1e-6)
    assert min(abs(v - math.log(k)) for v, k in zip(alone, (4, 2, 3))) > 1e-3  # the policy left the reference


def test_num_samples_takes_the_first_k(tmp_path, sample_rows):
    trainer = tiny_trainer("brain", tmp_path, {"num_samples": 2}, rows=sample_rows[:4])
    assert trainer.method.sequences_per_example == 2 and BRAIn().sequences_per_example is None
    assert [len(r) for r in trainer.train_dataset["rewards"]] == [2, 2, 2, 2]
    assert trainer.train_dataset["rewards"][2] == sample_rows[2]["rewards"][:2]
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(4)])
    assert batch["input_ids"].size(0) == 8 and "sequence_slots" not in batch and batch["rewards"].shape == (4, 2)


def test_a_few_steps_raise_the_weight_on_high_reward_samples(tmp_path, sample_rows):
    trainer = train_tiny("brain", tmp_path, rows=sample_rows, max_steps=6, learning_rate=2e-3,
                         training={"per_device_train_batch_size": 12})  # fmt: skip
    logs = training_logs(trainer)
    first, last = logs[0], logs[-1]
    uniform = sum(1 / len(r["completions"]) for r in sample_rows) / len(sample_rows)
    assert first["brain/best_weight"] == pytest.approx(uniform, abs=1e-6) and first["brain/margin"] == 0.0
    assert last["brain/best_weight"] > first["brain/best_weight"] + 0.2
    assert last["brain/margin"] > 1.0 and last["rewards/margins"] > 1.0 and last["rewards/accuracies"] == 1.0
    assert last["brain/kl"] < first["brain/kl"] and last["loss"] < first["loss"]


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/brain.yaml").read_text())
    assert recipe["method"] == "brain" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/brain.yaml", tmp_path, f"data.train.path={SAMPLE}")  # 2-4 per prompt
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert resolved == recipe["method_args"] == {"tau": 1.0, "num_samples": None}


def bad_rows(tmp_path, rows, name="bad.jsonl"):
    return write_jsonl(rows, tmp_path / name)


@pytest.mark.parametrize(
    "change, method_args, message",
    [
        ({"rewards": [1.0]}, {}, r"row 2: column 'rewards' has 1 values but 'completions' has 2: give one per entry"),
        ({"rewards": ["good", "bad"]}, {}, r"column 'rewards' must be a list of numbers"),
        ({}, {"num_samples": 3}, (r"row 1: column 'completions' has 2 completions but method_args.num_samples is 3: "
                                  r"lower num_samples")),
        ({"completions": ["only one"], "rewards": [1.0]}, {}, (r"row 2: column 'completions' has 1 completion\(s\); "
                                                              r"BRAIn needs at least 2")),
        ({"proposal_logps": [-3.0, -4.0]}, {}, r"row 1: column 'proposal_logps' is empty \(null\) but other rows"),
    ],
    ids=["length", "type", "num-samples", "one-completion", "partial-column"],
)
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, monkeypatch, change, method_args, message):

    from trl_plus import train

    forbid_model_loading(monkeypatch)
    good = {"prompt": "Say hi.", "completions": ["Hi!", "No."], "rewards": [1.0, -1.0]}
    rows = [good, {**good, **change}, good]
    if change.get("rewards") == ["good", "bad"]:
        rows = [{**row, "rewards": ["good", "bad"]} for row in rows]  # one Arrow type per column
    recipe = {"method": "brain", "method_args": method_args, "model": {"name_or_path": "tiny-llama"},
              "data": {"train": {"path": bad_rows(tmp_path, rows)}},
              "training": {"output_dir": str(tmp_path / "run")}}  # fmt: skip
    with pytest.raises(TrlPlusError, match=message) as info:
        train(recipe)
    assert "\n" not in str(info.value) and "bad.jsonl" in str(info.value)


def test_config_errors():
    with pytest.raises(ValidationError):
        BRAIn(tau=-1.0)
    with pytest.raises(ValidationError):
        BRAIn(num_samples=1)
    with pytest.raises(ValidationError):
        BRAIn(beta=0.1)
