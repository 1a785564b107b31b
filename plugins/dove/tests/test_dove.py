"""DOVE: the card's worked example, reductions to DPO, gradients, the per-side collator, real steps, the recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl import DPOConfig
from trl_plus_dove import DOVE, DOVECollator

from trl_plus import DPO, PlusTrainer, TrlPlusError
from trl_plus.testing import build_tokenizer, make_context, perturb, preference_rows, run_recipe_on_cpu, train_tiny

ROOT = Path(__file__).resolve().parents[3]


def spread(total, n):
    """``n`` equal per-token log-probs summing to ``total``."""
    return [total / n] * n


# Card worked example (β = 0.1, token sums): instruction / response log-probs of each side.
# chosen: policy −30 / −12, reference −31 / −13;
# rejected (another instruction): policy −25 / −15, reference −24 / −14.
CHOSEN_I, CHOSEN_R = (spread(-30, 6), spread(-31, 6)), (spread(-12, 4), spread(-13, 4))
REJECTED_I, REJECTED_R = (spread(-25, 5), spread(-24, 5)), (spread(-15, 3), spread(-14, 3))


def joint_context():
    """The card's pair scored jointly: every instruction and response token is in the mask."""
    policy = [[CHOSEN_I[0] + CHOSEN_R[0]], [REJECTED_I[0] + REJECTED_R[0]]]
    reference = [[CHOSEN_I[1] + CHOSEN_R[1]], [REJECTED_I[1] + REJECTED_R[1]]]
    return make_context(policy, reference)


def test_card_worked_example():
    out = DOVE(beta=0.1).loss(joint_context())
    assert out.loss.item() == pytest.approx(0.513015, abs=1e-6)  # Δ_joint = (−42 + 44) − (−40 + 38) = 4
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.4))), abs=1e-12)
    assert (out.rewards[0] - out.rewards[1]).item() == pytest.approx(0.1 * 4, abs=1e-12)
    # conditional only (responses scored, as DPO would): Δ = 2 → 0.598139
    conditional = make_context([[CHOSEN_R[0]], [REJECTED_R[0]]], [[CHOSEN_R[1]], [REJECTED_R[1]]])
    assert DOVE(beta=0.1).loss(conditional).loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert DPO(beta=0.1).loss(conditional).loss.item() == pytest.approx(0.598139, abs=1e-6)


@pytest.mark.parametrize("instruction", [([-2.0, -0.5, -3.0], [-1.0, -1.5, -0.2]), ([-9.0], [-0.1])])
def test_same_instruction_cancels_even_when_policy_and_reference_disagree_on_it(instruction):
    """A causal LM gives the shared instruction the same log-probs on both sides (same prefix), under the policy
    and under the reference separately, so the instruction terms cancel inside Δ whatever their values."""
    policy_i, reference_i = instruction
    assert sum(policy_i) != sum(reference_i)
    responses = ([[-1.0, -0.4], [-2.0, -0.3, -0.6]], [[-1.2, -0.1], [-1.5, -0.9, -0.2]])  # (policy, reference)
    joint = make_context([[policy_i + responses[0][0]], [policy_i + responses[0][1]]],
                         [[reference_i + responses[1][0]], [reference_i + responses[1][1]]])  # fmt: skip
    dpo = make_context([[responses[0][0]], [responses[0][1]]], [[responses[1][0]], [responses[1][1]]])
    assert DOVE(beta=0.1).loss(joint).loss.item() == pytest.approx(DPO(beta=0.1).loss(dpo).loss.item(), abs=1e-12)


def test_log2_at_init():
    ctx = joint_context()
    same = make_context(ctx.token_logps.detach().tolist(), ctx.token_logps.detach().tolist())
    assert DOVE().loss(same).loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_gradient_reaches_instruction_tokens_with_dpos_sign():
    beta = 0.1
    ctx = joint_context()
    DOVE(beta=beta).loss(ctx).loss.backward()
    g = ctx.token_logps.grad
    d = -beta / (1 + math.exp(beta * 4.0))  # ∂L/∂Δ = −β σ(−βΔ), one pair; ∂Δ/∂a_t = +1 (chosen), −1 (rejected)
    assert g[0, 0, :10].tolist() == pytest.approx([d] * 10, abs=1e-15, rel=1e-12)  # 6 instruction + 4 response
    assert g[1, 0, :8].tolist() == pytest.approx([-d] * 8, abs=1e-15, rel=1e-12)  # 5 instruction + 3 response
    assert (g[0, 0, :6] < 0).all() and (g[1, 0, :5] > 0).all()  # the instructions are trained, unlike in DPO
    assert (g[ctx.mask == 0] == 0).all()


# -- data -------------------------------------------------------------------------------------------------


def joint_rows(n=32, seed=0):
    """Per-side-prompt rows: odd rows compare (prompt_i, chosen_i) with another prompt's (prompt_j, rejected_j)
    ("good orange vs bad apple"), even rows are conditional pairs (the same prompt on both sides)."""
    rows = preference_rows(n, seed)
    out = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % n] if i % 2 else row
        out.append({"chosen_prompt": row["prompt"], "chosen": row["chosen"],
                    "rejected_prompt": other["prompt"], "rejected": other["rejected"]})  # fmt: skip
    return out


def same_prompt_rows(n=8):
    """The synthetic pairs in DOVE's format, with the pair's prompt on both sides."""
    return [{"chosen_prompt": r["prompt"], "chosen": r["chosen"], "rejected_prompt": r["prompt"],
             "rejected": r["rejected"]} for r in preference_rows(n)]  # fmt: skip


def test_collator_scores_instruction_and_response_of_each_side():
    tok = build_tokenizer()
    example = DOVE().tokenize({"chosen_prompt": "Add 1 and 2.", "chosen": "3", "rejected_prompt": "Hi?",
                               "rejected": "No."}, tok)  # fmt: skip
    assert tok.decode(example["chosen_prompt_ids"]) == "Add 1 and 2."
    assert tok.decode(example["chosen_ids"]) == "3</s>"
    assert tok.decode(example["rejected_prompt_ids"]) == "Hi?" and tok.decode(example["rejected_ids"]) == "No.</s>"
    joint = DOVECollator(tok.pad_token_id, None, "keep_start", joint=True)([example])
    conditional = DOVECollator(tok.pad_token_id, None, "keep_start", joint=False)([example])
    assert joint["input_ids"].shape == (2, 14) and torch.equal(joint["input_ids"], conditional["input_ids"])
    assert joint["attention_mask"].sum(1).tolist() == [14, 7]  # the sides have different lengths
    # joint: every real token but the first (nothing predicts it); conditional: the response (+ EOS) only
    assert joint["completion_mask"].tolist() == [[0] + [1] * 13, [0] + [1] * 6 + [0] * 7]
    assert conditional["completion_mask"].tolist() == [[0] * 12 + [1] * 2, [0] * 3 + [1] * 4 + [0] * 7]
    keep_end = DOVECollator(tok.pad_token_id, 5, "keep_end", joint=False)([example])
    assert keep_end["input_ids"][0].tolist() == (example["chosen_prompt_ids"] + example["chosen_ids"])[-5:]
    assert keep_end["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]


def trainers(model_dir, output_dir, specs):
    """PlusTrainers on the same tiny model, each with ``(method, method_args, rows)``, all perturbed alike."""
    from datasets import Dataset

    tok = build_tokenizer()
    common = dict(output_dir=str(output_dir), report_to="none", bf16=False, gradient_checkpointing=False,
                  dataloader_pin_memory=False)  # fmt: skip
    out = []
    for method, method_args, rows in specs:
        trainer = PlusTrainer(model_dir, args=DPOConfig(**common), method=method, method_args=method_args,
                              train_dataset=Dataset.from_list(rows), processing_class=tok)  # fmt: skip
        perturb(trainer.model)  # the same noise for every copy: the policy leaves the reference
        trainer.model.eval()
        out.append(trainer)
    return out


def first_batch(trainer, n=8):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def test_identical_prompts_reduce_to_dpo_on_a_real_batch(tiny_model_dir, tmp_path):
    dpo, conditional, joint = trainers(tiny_model_dir, tmp_path, [
        ("dpo", None, preference_rows(8)),
        ("dove", {"joint_distribution": False}, same_prompt_rows()),
        ("dove", {"joint_distribution": True}, same_prompt_rows()),
    ])  # fmt: skip
    dpo_batch, cond_batch, joint_batch = (first_batch(t) for t in (dpo, conditional, joint))
    for key in ("input_ids", "attention_mask", "completion_mask"):  # the very same tokens and scored positions
        assert torch.equal(cond_batch[key], dpo_batch[key]), key
    assert torch.equal(joint_batch["input_ids"], dpo_batch["input_ids"])
    assert (joint_batch["completion_mask"].sum() > dpo_batch["completion_mask"].sum() + 100).item()
    with torch.no_grad():
        loss = {name: t.compute_loss(t.model, b).item()
                for name, t, b in (("dpo", dpo, dpo_batch), ("cond", conditional, cond_batch),
                                   ("joint", joint, joint_batch))}  # fmt: skip
    assert abs(loss["dpo"] - math.log(2)) > 1e-3
    assert loss["cond"] == pytest.approx(loss["dpo"], abs=1e-6)  # the same sums: bit-identical here
    # joint scoring with the same prompt: the prompt terms cancel within the policy and within the reference, up to
    # float32 rounding of the joint sums J (prompt + response): each is exact to about eps32·log2(L)·|J|, so the
    # loss (|∂L/∂z| ≤ 1, z = β·[(Jθ − Jref)(y_w) − (Jθ − Jref)(y_l)]) to 2β·eps32·log2(L)·(|J(y_w)| + |J(y_l)|),
    # batch means (~5e-5 here; seen: 2.4e-7); a prompt term left on one side would move z by β·|ℓ(x)| ≈ 8
    joint_metrics = joint._metrics["eval"]
    scale = abs(joint_metrics["logps/chosen"][-1]) + abs(joint_metrics["logps/rejected"][-1])
    tol = 2 * 0.1 * torch.finfo(torch.float32).eps * math.log2(joint_batch["input_ids"].shape[1]) * scale  # β 0.1
    assert loss["joint"] == pytest.approx(loss["dpo"], abs=tol)
    joint_logps = joint._metrics["eval"]["logps/chosen"][-1]
    assert joint_logps < dpo._metrics["eval"]["logps/chosen"][-1] - 10  # ... though each side's J is much lower


def test_different_prompts_joint_differs_from_conditional(tiny_model_dir, tmp_path):
    rows = joint_rows(8)
    conditional, joint = trainers(tiny_model_dir, tmp_path, [
        ("dove", {"joint_distribution": False}, rows), ("dove", {"joint_distribution": True}, rows)])  # fmt: skip
    with torch.no_grad():
        a = conditional.compute_loss(conditional.model, first_batch(conditional)).item()
        b = joint.compute_loss(joint.model, first_batch(joint)).item()
    assert abs(a - b) > 1e-3


def test_a_few_steps_raise_the_joint_margin(tmp_path):
    trainer = train_tiny("dove", tmp_path, rows=joint_rows(32), max_steps=8)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]


def test_plain_preference_file_names_the_missing_per_side_prompts(tmp_path):
    with pytest.raises(TrlPlusError, match=r"missing columns 'chosen_prompt', 'rejected_prompt'.*'dove' needs "
                                           r"chosen_prompt, chosen, rejected_prompt, rejected"):  # fmt: skip
        train_tiny("dove", tmp_path, rows=preference_rows(8), max_steps=1)


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError):
        DOVE(joint=True)  # a typo is an error, not a silently ignored key
    with pytest.raises(ValidationError):
        DOVE(beta=0)
    assert DOVE().config.joint_distribution is True and DOVE().config.beta == 0.1


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/dove.yaml").read_text())
    assert recipe["method"] == "dove" and recipe["model"]["quantization"]["load_in_4bit"]
    data = "recipes/data/dove_quickstart_prefs.jsonl"  # the CPU check's file: per-side prompts, joint and conditional
    result = run_recipe_on_cpu("recipes/dove.yaml", tmp_path / "run", f"data.train.path={data}")
    assert result.global_step == 2 and (tmp_path / "run" / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "run" / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
