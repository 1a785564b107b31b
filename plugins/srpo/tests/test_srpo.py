"""SRPO: the card's worked example and special cases, IPO as a limit, gradients, the six-sequence collator,
real steps, the recipe and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl import DPOConfig
from trl_plus_srpo import PR_GENERATION_TEMPLATE, PR_REVISION_TEMPLATE, SRPO, SRPOCollator

from trl_plus import DPO, PlusTrainer, TrlPlusError
from trl_plus.testing import build_tokenizer, make_context, perturb, preference_rows, run_recipe_on_cpu, train_tiny

ROOT = Path(__file__).resolve().parents[3]


def context(ratios, ref=0.0):
    """One pair of six sequence-level log-ratios ``[r_w, r_l, r_w|l, r_l|l, r_w|w, r_l|w]`` (reference at ``ref``)."""
    return make_context([[[ref + r]] for r in ratios], [[[ref]] for _ in ratios])


# Card worked example: r_w|l = 2, r_l|l = −1, r_w|w = 0.5, r_l|w = −0.5, r_w = 1, r_l = −1 (β = 0.1, α = 0.8).
CARD = [1.0, -1.0, 2.0, -1.0, 0.5, -0.5]


def test_card_worked_example():
    out = SRPO(beta=0.1, alpha=0.8).loss(context(CARD, ref=-7.0))
    assert out.metrics["srpo/self_improvement_loss"].item() == pytest.approx(0.2, abs=1e-12)  # 0.2² + 0.4²
    assert out.metrics["srpo/generative_loss"].item() == pytest.approx(0.3025, abs=1e-12)  # (0.1·4.5 − 1)²
    assert out.loss.item() == pytest.approx(0.2205, abs=1e-12)
    assert out.metrics["srpo/revision_margin_given_rejected"].item() == pytest.approx(0.3, abs=1e-12)
    assert out.metrics["srpo/revision_margin_given_chosen"].item() == pytest.approx(0.1, abs=1e-12)
    assert out.rewards[:, 0].tolist() == pytest.approx([0.1 * r for r in CARD], abs=1e-12)


def test_batch_mean_and_initialisation():
    other = [0.0, 3.0, 1.0, 2.0, -1.0, 0.0]  # S = 0.6² + 0.6² = 0.72, G = (0.1·(−2) − 1)² = 1.44
    batch = make_context([[[r], [o]] for r, o in zip(CARD, other)], [[[0.0], [0.0]] for _ in CARD])
    expected = (0.2205 + (0.2 * 1.44 + 0.8 * 0.72)) / 2
    assert SRPO(beta=0.1, alpha=0.8).loss(batch).loss.item() == pytest.approx(expected, abs=1e-12)
    for alpha in (0.0, 0.3, 0.8, 1.0):  # all r = 0: S = 2·(1/2)², G = 1
        at_init = SRPO(alpha=alpha).loss(context([0.0] * 6, ref=-3.0)).loss.item()
        assert at_init == pytest.approx((1 - alpha) * 1 + alpha * 0.5, abs=1e-12)
    assert SRPO().loss(context([0.0] * 6)).loss.item() == pytest.approx(0.6, abs=1e-12)  # defaults α = 0.8


def test_zero_at_the_optimum_and_alpha_extremes():
    beta = 0.1
    # β(r_w|l − r_l|l) = β(r_w|w − r_l|w) = 1/2 and β(r_w|l + r_w − r_l|w − r_l) = 1
    optimum = [3.0, -1.0, 5.0, 0.0, 4.0, -1.0]
    assert SRPO(beta=beta, alpha=0.8).loss(context(optimum)).loss.item() == pytest.approx(0.0, abs=1e-12)
    out = SRPO(beta=beta, alpha=0.0).loss(context(CARD))
    assert out.loss.item() == pytest.approx(out.metrics["srpo/generative_loss"].item(), abs=1e-15)
    out = SRPO(beta=beta, alpha=1.0).loss(context(CARD))
    assert out.loss.item() == pytest.approx(out.metrics["srpo/self_improvement_loss"].item(), abs=1e-15)


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_alpha_zero_without_revision_terms_is_scaled_ipo(beta):
    """r_·|· = 0, α = 0: L = (β(r_w − r_l) − 1)² = β² (Δ − 1/β)², the core's IPO (token sums) with τ = β/2."""
    for r_w, r_l in ((1.5, -2.0), (-3.0, 4.0)):
        srpo = SRPO(beta=beta, alpha=0.0).loss(context([r_w, r_l, 0, 0, 0, 0])).loss.item()
        ipo_ctx = make_context([[[r_w]], [[r_l]]], [[[0.0]], [[0.0]]])
        ipo = DPO(beta=beta / 2, loss_type="ipo", ipo_normalize_by_length=False).loss(ipo_ctx).loss.item()
        assert srpo == pytest.approx(beta**2 * ipo, rel=1e-12, abs=1e-15)


def test_gradients_push_revisions_towards_the_chosen_answer():
    beta, alpha = 0.1, 0.8
    ctx = context(CARD)
    SRPO(beta=beta, alpha=alpha).loss(ctx).loss.backward()
    g = ctx.token_logps.grad[:, 0, 0].tolist()
    a = 2 * (0.5 - beta * 3.0)  # 2 × residual of the revision given y_l (0.4)
    b = 2 * (0.5 - beta * 1.0)  # given y_w (0.8)
    c = 2 * (beta * 4.5 - 1)  # generative residual × 2 (−1.1)
    expected = [
        (1 - alpha) * c * beta,  # r_w
        -(1 - alpha) * c * beta,  # r_l
        -alpha * a * beta + (1 - alpha) * c * beta,  # y_w | P1(x, y_l)
        alpha * a * beta,  # y_l | P1(x, y_l)
        -alpha * b * beta,  # y_w | P1(x, y_w)
        alpha * b * beta - (1 - alpha) * c * beta,  # y_l | P1(x, y_w)
    ]
    assert g == pytest.approx(expected, abs=1e-15, rel=1e-12)
    assert g[0] < 0 < g[1] and g[2] < 0 < g[3] and g[4] < 0 < g[5]  # raise y_w, lower y_l, in every context


# -- the six sequences -------------------------------------------------------------------------------------


def test_tokenize_and_collate_six_sequences():
    tok = build_tokenizer()
    method = SRPO(generation_template="Q: {prompt}\nA:", revision_template="Q: {prompt}\nOld: {completion}\nA:")
    example = method.tokenize({"prompt": "1+1?", "chosen": "2", "rejected": "no"}, tok)
    batch = SRPOCollator(tok.pad_token_id, None)([example])
    assert batch["input_ids"].shape[0] == 6
    texts, scored = [], []
    for ids, attention, mask in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        n = int(attention.sum())
        texts.append(tok.decode(ids[:n]))
        scored.append(tok.decode(ids[mask.bool()]))
        assert (mask[:n].diff() >= 0).all()  # the prompt is a masked prefix, then the completion is scored
    assert texts == [
        "Q: 1+1?\nA:2</s>",
        "Q: 1+1?\nA:no</s>",
        "Q: 1+1?\nOld: no\nA:2</s>",
        "Q: 1+1?\nOld: no\nA:no</s>",
        "Q: 1+1?\nOld: 2\nA:2</s>",
        "Q: 1+1?\nOld: 2\nA:no</s>",
    ]
    assert scored == ["2</s>", "no</s>", "2</s>", "no</s>", "2</s>", "no</s>"]
    pr = SRPO().tokenize({"prompt": "POST: x\n", "chosen": " a", "rejected": " b"}, tok)
    assert tok.decode(pr["srpo_prompt_ids"][0]) == PR_GENERATION_TEMPLATE.format(prompt="POST: x\n")
    for k, previous in ((1, " b"), (2, " a")):  # P1(x, y_l), P1(x, y_w)
        rendered = PR_REVISION_TEMPLATE.format(prompt="POST: x\n", completion=previous)
        assert pr["srpo_prompt_ids"][k] == tok(rendered)["input_ids"]


def test_default_templates_are_the_prs_prompt_construction():
    """srpo_trainer.tokenize_row: prefix_zero + "\\n" + x + post and prefix_n + "\\n" + x + "EXAMPLE SUMMARY: " + y′ +
    "\\n\\n" + post, with the strings of srpo_tldr.py at the PR's commit 2dac9d5 (later commits use a chat template)."""
    task = "Write a both precise and concise summary of the contents of the POST."
    prefix_zero = "Below is a reddit POST and the corresponding SUBREDDIT and TITLE.\n" + task
    prefix_n = "Below is a reddit POST and the corresponding SUBREDDIT, TITLE, and an EXAMPLE\nSUMMARY. " + task
    post, x, y = "TL;DR:", "SUBREDDIT: r/a\nPOST: b\n", " c"
    assert SRPO().config.generation_template.format(prompt=x) == prefix_zero + "\n" + x + post
    assert SRPO().config.revision_template.format(prompt=x, completion=y) == (
        prefix_n + "\n" + x + "EXAMPLE SUMMARY: " + y + "\n\n" + post
    )


def test_collator_orders_sequence_major_and_truncates():
    examples = [
        {"srpo_prompt_ids": [[1, 2], [3, 4, 5], [6]], "srpo_completion_ids": [[10 + k] * (k + 1) for k in range(6)]},
        {"srpo_prompt_ids": [[7], [8], [9]], "srpo_completion_ids": [[20 + k] for k in range(6)]},
    ]
    batch = SRPOCollator(0, 4, "keep_start")(examples)
    assert batch["input_ids"].shape == (12, 4)
    assert batch["input_ids"][0].tolist() == [1, 2, 10, 0] and batch["input_ids"][1].tolist() == [7, 20, 0, 0]
    assert batch["input_ids"][4].tolist() == [3, 4, 5, 12] and batch["completion_mask"][4].tolist() == [0, 0, 0, 1]
    assert batch["input_ids"][11].tolist() == [9, 25, 0, 0] and batch["completion_mask"][11].tolist() == [0, 1, 0, 0]
    end = SRPOCollator(0, 3, "keep_end")(examples)
    assert end["input_ids"][10].tolist() == [15, 15, 15] and end["completion_mask"][10].tolist() == [1, 1, 1]


def srpo_trainer(model_dir, output_dir, rows, **method_args):
    from datasets import Dataset

    args = DPOConfig(output_dir=str(output_dir), report_to="none", bf16=False, gradient_checkpointing=False,
                     dataloader_pin_memory=False)  # fmt: skip
    trainer = PlusTrainer(model_dir, args=args, method="srpo", method_args=method_args,
                          train_dataset=Dataset.from_list(rows), processing_class=build_tokenizer())  # fmt: skip
    perturb(trainer.model)  # away from the reference: every r ≠ 0
    trainer.model.eval()
    return trainer


def test_identical_answers_make_revision_pairs_coincide(tiny_model_dir, tmp_path):
    rows = [{**r, "rejected": r["chosen"]} for r in preference_rows(4)]
    trainer = srpo_trainer(tiny_model_dir, tmp_path, rows, beta=0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    seqs = batch["input_ids"].view(6, 4, -1)
    assert torch.equal(seqs[2], seqs[3]) and torch.equal(seqs[4], seqs[5]) and torch.equal(seqs[2], seqs[4])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    assert metrics["srpo/self_improvement_loss"] == pytest.approx(0.5, abs=1e-6)  # S = 2·(1/2)²
    assert abs(metrics["rewards/chosen"]) > 1e-3  # the policy did move away from the reference
    assert loss == pytest.approx(0.2 * metrics["srpo/generative_loss"] + 0.8 * 0.5, abs=1e-6)


def test_a_few_steps_raise_the_generation_and_revision_margins(tmp_path):
    short = {"generation_template": "{prompt}\n", "revision_template": "{prompt}\nDraft: {completion}\nBetter: "}
    trainer = train_tiny("srpo", tmp_path, method_args={"beta": 0.1, **short}, rows=preference_rows(24), max_steps=4)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(0.6, abs=1e-6)  # all r = 0 at the first step
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.1
    for name in ("srpo/revision_margin_given_rejected", "srpo/revision_margin_given_chosen"):
        assert logs[-1][name] > logs[0][name] + 0.1, name


def test_missing_rejected_column_is_a_clear_error(tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in preference_rows(8)]
    with pytest.raises(TrlPlusError, match=r"missing column 'rejected': method 'srpo' needs prompt, chosen, rejected"):
        train_tiny("srpo", tmp_path, rows=rows, max_steps=1)


def test_chat_format_rows_are_refused():
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip
    with pytest.raises(TypeError, match="plain text"):
        SRPO().tokenize(row, build_tokenizer())


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="completion"):
        SRPO(revision_template="Improve: {prompt}")  # the previous answer is missing
    with pytest.raises(ValidationError, match="format string"):
        SRPO(generation_template="{prompt} {answer}")
    with pytest.raises(ValidationError):
        SRPO(alpha=1.5)
    with pytest.raises(ValidationError):
        SRPO(alpah=0.5)  # a typo is an error, not a silently ignored key
    assert SRPO().config.beta == 0.01 and SRPO().config.alpha == 0.8


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/srpo.yaml").read_text())
    assert recipe["method"] == "srpo" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/srpo.yaml", tmp_path, "training.per_device_train_batch_size=1")
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]


def test_recipe_uses_the_prs_final_training_command():
    """srpo_tldr.py's post-SFT LoRA command from 2024-07-13 to the PR's final head: --learning_rate=2e-5,
    --per_device_train_batch_size=32 --gradient_accumulation_steps=4 (2dac9d5's 2e-4 and 32 x 8 were superseded);
    the recipe keeps 1 pair per micro-batch and accumulates the same 128 pairs."""
    training = yaml.safe_load((ROOT / "recipes/srpo.yaml").read_text())["training"]
    assert training["learning_rate"] == 2e-5
    assert training["per_device_train_batch_size"] == 1
    assert training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] == 32 * 4
    assert (training["lr_scheduler_type"], training["warmup_steps"], training["weight_decay"]) == ("cosine", 150, 0.1)
