"""AlignDistil: the card's worked example, a transcription of the official off-policy trainer's four
``reward_boost_type`` branches, equal teachers (== the policy: loss 0, gradient 0), bounds and invariances, length
normalisation, the position that predicts each response token (the official off-by-one not copied), gradients,
``use_rejected``, errors; through the trainer with both teachers as frozen adapters on the policy's LoRA base (loss
and gradient 0 when all three are equal, gradients only in the trained adapter, the positions, a few steps, the
recipe)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig
from pydantic import ValidationError
from trl_plus_aligndistil import AlignDistil, token_losses

from trl_plus import FrozenOutputs, LossContext, Teacher, TrlPlusError
from trl_plus.testing import (
    CPU_OVERRIDES,
    logits_head,
    preference_rows,
    save_tiny_adapter,
    save_tiny_model,
    tiny_trainer,
    training_logs,
)

ROOT = Path(__file__).resolve().parents[3]

# The card's example: β = 0.1, r = 10, T = 1, one sequence, two response positions, V = 4.
POLICY = [[1.0, 0.5, -0.5, 0.0], [0.2, 0.1, 0.0, -0.3]]
DPO_LOGITS = [[1.5, 0.2, -0.4, 0.0], [0.0, 0.6, -0.2, -0.3]]
REV_LOGITS = [[0.8, 0.7, -0.3, 0.1], [0.3, -0.1, 0.1, -0.2]]


def context(policy, dpo, rev, mask):
    """A context over grid logits ``[K, B, T, V]`` (policy, with grad) and ``mask`` ``[K, B, T]``; the teachers' logits
    are their grid rows at the scored positions (``[M, V]``, in ``ctx.scored`` order)."""
    mask = torch.tensor(mask, dtype=torch.float32)
    policy = torch.tensor(policy, dtype=torch.float32).requires_grad_()
    dpo, rev = (torch.tensor(x, dtype=torch.float32)[mask.bool()] for x in (dpo, rev))
    ctx = LossContext(token_logps=torch.zeros(mask.shape), mask=mask, head=logits_head(policy),
                      frozen={"dpo": FrozenOutputs(logits=dpo), "rev": FrozenOutputs(logits=rev)})  # fmt: skip
    ctx.test_logits = policy
    return ctx


def card_context():
    return context([[POLICY]], [[DPO_LOGITS]], [[REV_LOGITS]], [[[1, 1]]])


def test_card_worked_example():
    p, d, r = (torch.tensor(x, dtype=torch.float64) for x in (POLICY, DPO_LOGITS, REV_LOGITS))
    losses, weight, tvd, _ = token_losses(p, d, r, AlignDistil().config)
    assert tvd.tolist() == pytest.approx([0.4841848, 0.3986192], abs=1e-7)
    assert weight.tolist() == pytest.approx([4.842848, 3.987192], abs=1e-6)
    assert (0.1 / weight).tolist() == pytest.approx([0.02064901, 0.02508031], abs=1e-8)
    assert (losses * weight / 0.1).tolist() == pytest.approx([2.212232, 1.963594], abs=1e-6)  # KL(p_θ ‖ q)
    assert losses.tolist() == pytest.approx([0.04568040, 0.04924754], abs=1e-8)
    assert AlignDistil(beta=0.1, beta2=10).loss(card_context()).loss.item() == pytest.approx(0.04746397, abs=1e-7)
    unnormalised = AlignDistil(reward_len_norm=False).loss(card_context()).loss.item()
    assert unnormalised == pytest.approx(0.09492794, abs=1e-7)


# -- the official code, transcribed ------------------------------------------------------------------------------


def official_rlhf_loss(student_logits, teacher_logits, reference_logits, mask, args):
    """``aligndistil_offpolicy_trainer.py`` (fit) on ``[B, L, V]`` logits already restricted by ``mask`` ``[B, L]``;
    ``teacher`` = the DPO model, ``reference`` = the model given as ``--ref_model`` (the reverse-DPO model)."""
    stu_probs = torch.softmax(student_logits, dim=-1, dtype=torch.float32)
    stu_lprobs = torch.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    tea_lprobs = torch.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
    ref_lprobs = torch.log_softmax(reference_logits, dim=-1, dtype=torch.float32)
    if args["reward_boost_type"] == "theorem1":
        weight = args["beta"] / args["beta2"]
        final = weight * teacher_logits + (1 - weight) * reference_logits
        final_tea_lprobs = torch.log_softmax(final / args["kd_temperature"], dim=-1, dtype=torch.float32)
        rlhf_loss = (stu_probs * (stu_lprobs - final_tea_lprobs)).sum(-1) * args["beta2"]
    elif args["reward_boost_type"] == "theorem1_contrast":
        weight = args["beta"] / args["beta2"]
        final = weight * (teacher_logits - reference_logits) + teacher_logits
        final_tea_lprobs = torch.log_softmax(final / args["kd_temperature"], dim=-1, dtype=torch.float32)
        rlhf_loss = (stu_probs * (stu_lprobs - final_tea_lprobs)).sum(-1) * args["beta2"]
    elif args["reward_boost_type"] == "theorem1_adaptive":
        tvd = (tea_lprobs.exp() - ref_lprobs.exp()).abs().sum(-1)
        weight = tvd * args["beta2"] + 1e-3
        beta2 = args["beta"] / weight
        final = weight.unsqueeze(-1) * teacher_logits + (1 - weight.unsqueeze(-1)) * reference_logits
        final_tea_lprobs = torch.log_softmax(final / args["kd_temperature"], dim=-1, dtype=torch.float32)
        rlhf_loss = (stu_probs * (stu_lprobs - final_tea_lprobs)).sum(-1) * beta2
    else:  # aligndistil
        tvd = (tea_lprobs.exp() - ref_lprobs.exp()).abs().sum(-1)
        weight = tvd * args["beta2"] + 1e-3
        beta2 = args["beta"] / weight
        final = weight.unsqueeze(-1) * (teacher_logits - reference_logits) + teacher_logits
        final_tea_lprobs = torch.log_softmax(final / args["kd_temperature"], dim=-1, dtype=torch.float32)
        rlhf_loss = (stu_probs * (stu_lprobs - final_tea_lprobs)).sum(-1) * beta2
    rlhf_loss = (rlhf_loss * mask).sum(-1)
    if args["reward_len_norm"]:
        rlhf_loss = rlhf_loss / mask.sum(-1)
    return rlhf_loss.mean(0) * args["kd_coef"]


@pytest.mark.parametrize("boost", ["aligndistil", "theorem1", "theorem1_contrast", "theorem1_adaptive"])
@pytest.mark.parametrize("len_norm", [True, False])
def test_equals_the_official_trainer(boost, len_norm):
    torch.manual_seed(0)
    logits = [2 * torch.randn(3, 6, 11) for _ in range(3)]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.float32)
    args = dict(beta=0.1, beta2=7.0, kd_temperature=1.3, reward_len_norm=len_norm, kd_coef=0.8, reward_boost_type=boost)
    official = official_rlhf_loss(*logits, mask, args)
    ours = AlignDistil(**{k: v for k, v in args.items()}).loss(
        context(logits[0].unsqueeze(0).tolist(), logits[1].unsqueeze(0).tolist(), logits[2].unsqueeze(0).tolist(),
                mask.unsqueeze(0).tolist())  # fmt: skip
    )
    assert ours.loss.item() == pytest.approx(official.item(), rel=1e-6, abs=1e-7)


def test_equal_teachers_equal_to_the_policy_give_loss_and_gradient_zero():
    torch.manual_seed(1)
    same = torch.randn(1, 2, 4, 9).tolist()
    ctx = context(same, same, same, [[[0, 1, 1, 1], [1, 1, 0, 0]]])
    out = AlignDistil().loss(ctx)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert ctx.test_logits.grad.abs().max().item() == 0.0
    assert out.metrics["aligndistil/weight"].item() == pytest.approx(1e-3)  # TVD = 0: w = the floor


def test_equal_teachers_distil_the_dpo_model_with_coefficient_beta_over_floor():
    torch.manual_seed(2)
    policy, teacher = torch.randn(1, 1, 3, 7), torch.randn(1, 1, 3, 7)
    ctx = context(policy.tolist(), teacher.tolist(), teacher.tolist(), [[[1, 1, 1]]])
    kl = (policy.softmax(-1) * (policy.log_softmax(-1) - teacher.log_softmax(-1))).sum(-1)
    assert AlignDistil(beta=0.1).loss(ctx).loss.item() == pytest.approx((0.1 / 1e-3 * kl).mean().item(), rel=1e-5)


def test_bounds_and_invariance_to_a_constant_per_model_and_position():
    torch.manual_seed(3)
    logits = [torch.randn(1, 2, 5, 8) for _ in range(3)]
    mask = [[[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]]]
    cfg = AlignDistil(beta2=10).config
    losses, weight, _, _ = token_losses(*(x[0][torch.tensor(mask[0]).bool()] for x in logits), cfg)
    assert (losses >= 0).all() and (weight >= 1e-3).all() and (weight <= 2 * 10 + 1e-3).all()
    base = AlignDistil().loss(context(*(x.tolist() for x in logits), mask)).loss.item()
    shifted = [x + torch.randn(1, 2, 5, 1) * 5 for x in logits]  # a different constant per model and position
    assert AlignDistil().loss(context(*(x.tolist() for x in shifted), mask)).loss.item() == pytest.approx(base, rel=1e-5)


def test_length_normalisation_duplicated_positions_leave_the_sequence_loss():
    once = AlignDistil().loss(card_context()).loss.item()
    twice = context([[POLICY * 2]], [[DPO_LOGITS * 2]], [[REV_LOGITS * 2]], [[[1, 1, 1, 1]]])
    assert AlignDistil().loss(twice).loss.item() == pytest.approx(once, rel=1e-6)
    assert AlignDistil(reward_len_norm=False).loss(twice).loss.item() == pytest.approx(2 * 0.09492794, abs=1e-6)
    # the batch mean is over sequences: a second, shorter sequence weighs as much as the first
    both = context([[POLICY, [POLICY[0], [0.0] * 4]]], [[DPO_LOGITS, [DPO_LOGITS[0], [0.0] * 4]]],
                   [[REV_LOGITS, [REV_LOGITS[0], [0.0] * 4]]], [[[1, 1], [1, 0]]])  # fmt: skip
    assert AlignDistil().loss(both).loss.item() == pytest.approx((0.04746397 + 0.04568040) / 2, abs=1e-7)


def test_each_response_token_uses_the_distribution_that_predicts_it():
    # grid position t holds the distribution predicting label t (the core's alignment). The policy equals both
    # teachers there and differs one position later (what the official trainer reads: the logits AT the response
    # tokens' positions): our loss is 0, the official alignment's is not.
    torch.manual_seed(4)
    teacher = torch.randn(1, 1, 4, 6)
    policy = teacher.clone()
    policy[0, 0, 3] = torch.randn(6) * 3  # the position after the last response token
    mask = torch.tensor([[[0, 1, 1, 0]]], dtype=torch.float32)  # labels 1, 2 scored: rows 1, 2 predict them
    ours = AlignDistil().loss(context(policy.tolist(), teacher.tolist(), teacher.tolist(), mask.tolist()))
    assert abs(ours.loss.item()) < 1e-7
    shifted = torch.tensor([[[0, 0, 1, 1]]], dtype=torch.float32)  # the official trainer's rows for the same tokens
    official = official_rlhf_loss(policy[0], teacher[0], teacher[0], shifted[0],
                                  dict(beta=0.1, beta2=10, kd_temperature=1.0, reward_len_norm=True, kd_coef=1.0,
                                       reward_boost_type="aligndistil"))  # fmt: skip
    assert official.item() > 1e-2


def test_gradient_is_c_times_the_reverse_kl_gradient_and_teachers_get_none():
    ctx = card_context()
    dpo, rev = ctx.frozen["dpo"].logits.requires_grad_(), ctx.frozen["rev"].logits.requires_grad_()
    AlignDistil().loss(ctx).loss.backward()
    assert dpo.grad is None and rev.grad is None  # the teacher side is no-grad
    p, d, r = (torch.tensor(x, dtype=torch.float64) for x in (POLICY, DPO_LOGITS, REV_LOGITS))
    tvd = (d.softmax(-1) - r.softmax(-1)).abs().sum(-1)
    w = 10 * tvd + 1e-3
    log_q = (d + w[:, None] * (d - r)).log_softmax(-1)
    log_p = p.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1, keepdim=True)
    expected = (0.1 / w)[:, None] * log_p.exp() * (log_p - log_q - kl) / 2  # ∂/∂z of c·KL, length-normalised
    assert torch.allclose(ctx.test_logits.grad[0, 0].double(), expected, atol=1e-6)


def test_use_rejected_distils_both_responses():
    model = AlignDistil(use_rejected=True)
    assert model.sequences_per_example == 2 and "rejected_ids" in model.tokenized_columns
    assert AlignDistil().sequences_per_example == 1 and AlignDistil.data_fields == ("prompt", "chosen")
    both = context([[POLICY], [POLICY[::-1]]], [[DPO_LOGITS], [DPO_LOGITS[::-1]]], [[REV_LOGITS], [REV_LOGITS[::-1]]],
                   [[[1, 1]], [[1, 1]]])  # fmt: skip
    assert model.loss(both).loss.item() == pytest.approx(0.04746397, abs=1e-7)  # the same tokens, reordered


def test_clear_errors():
    with pytest.raises(ValidationError, match="beta2 must be > 0"):
        AlignDistil(reward_boost_type="theorem1", beta2=0)
    with pytest.raises(ValidationError):
        AlignDistil(reward_boost_type="gkd")
    with pytest.raises(ValidationError):
        AlignDistil(beta=0)
    ctx = card_context()
    ctx.frozen = {"dpo": ctx.frozen["dpo"]}
    with pytest.raises(TrlPlusError, match="teachers.rev") as err:
        AlignDistil().loss(ctx)
    assert "\n" not in str(err.value)
    ctx = card_context()
    ctx.frozen = {"dpo": FrozenOutputs(logits=torch.zeros(3, 4)), "rev": ctx.frozen["rev"]}
    with pytest.raises(TrlPlusError, match=r"teachers.dpo gives logits shaped \(3, 4\); expected \[2, V\]"):
        AlignDistil().loss(ctx)
    with pytest.raises(TrlPlusError, match="rejected"):
        AlignDistil(use_rejected=True).tokenize({"prompt": "a", "chosen": "b"}, None)


def test_chunks_of_rows_change_nothing(monkeypatch):
    import trl_plus_aligndistil

    torch.manual_seed(5)
    logits = [torch.randn(1, 3, 5, 7) for _ in range(3)]
    mask = [[[0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 0]]]
    whole = context(*(x.tolist() for x in logits), mask)
    AlignDistil().loss(whole).loss.backward()
    monkeypatch.setattr(trl_plus_aligndistil, "CHUNK", 2)  # 10 scored rows in 5 chunks
    chunked = context(*(x.tolist() for x in logits), mask)
    out = AlignDistil().loss(chunked)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(AlignDistil().loss(whole).loss.item(), rel=1e-6)
    assert torch.allclose(chunked.test_logits.grad, whole.test_logits.grad, atol=1e-8)


# -- through the trainer: the two teachers as frozen adapters on the policy's LoRA base ----------------------------

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny base; two random teacher adapters on it (π_dpo, π_rev) and one that changes nothing (B = 0)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("aligndistil")
    base = save_tiny_model(root / "base")
    identity = root / "identity"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**LORA)).save_pretrained(identity)
    return {"base": base, "dpo": save_tiny_adapter(base, root / "dpo", seed=1),
            "rev": save_tiny_adapter(base, root / "rev", seed=2), "identity": str(identity)}  # fmt: skip


def adapter_trainer(tiny, output_dir, dpo, rev, method="aligndistil", **kwargs):
    from transformers import AutoModelForCausalLM

    return tiny_trainer(method, output_dir, model=AutoModelForCausalLM.from_pretrained(tiny["base"]),
                        peft_config=LoraConfig(**LORA), rows=preference_rows(8),
                        teachers={"dpo": Teacher(adapter=tiny[dpo]), "rev": Teacher(adapter=tiny[rev])}, **kwargs)


def first_batch(trainer):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))


def test_equal_adapters_equal_to_the_policy_give_loss_and_gradient_zero(tiny, tmp_path):
    # the policy's fresh LoRA and both teacher adapters have B = 0: π_dpo == π_rev == π_θ, exactly
    trainer = adapter_trainer(tiny, tmp_path, "identity", "identity")
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().max().item() == 0.0 for g in grads)


def merged(tiny, name):
    """Teacher ``name`` as a plain model: its adapter merged into the base (independent of the core's adapters)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), tiny[name]).merge_and_unload()


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """One trainer with the two random teacher adapters: the first batch's context, loss, gradients and the three
    models' full logits before training, then 3 optimiser steps on that batch."""
    seen = []

    class Spy(AlignDistil):
        def loss(self, ctx):
            seen.append(ctx)
            return super().loss(ctx)

    trainer = adapter_trainer(tiny, tmp_path_factory.mktemp("run"), "dpo", "rev", max_steps=3, method=Spy())
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    ctx = seen[0]
    loss.backward()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    grads = {n: (p.requires_grad, p.grad) for n, p in policy.named_parameters()}
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        full = {"policy": trainer.forward_logits(trainer.model, batch).logits.float()}
        full.update({name: merged(tiny, name)(**inputs).logits.float() for name in ("dpo", "rev")})
    trainer.model.zero_grad()
    trainer.train()
    return {"trainer": trainer, "batch": batch, "loss": loss.item(), "grads": grads, "full": full, "ctx": ctx}


def test_only_the_trainable_adapter_receives_gradients(run):
    grads = run["grads"]
    teachers = [n for n in grads if ".teacher_dpo." in n or ".teacher_rev." in n]
    assert teachers and all(not trainable and grad is None for trainable, grad in (grads[n] for n in teachers))
    trained = [n for n in grads if ".default." in n]
    assert all(grads[n][0] for n in trained) and all(grads[n][1] is not None for n in trained if "lora_B" in n)
    assert any(grads[n][1].abs().max() > 0 for n in trained if "lora_B" in n)
    assert all(not trainable for n, (trainable, _) in grads.items() if "lora_" not in n)  # the base is frozen


def test_the_trainer_scores_each_token_with_the_distribution_that_predicts_it(run):
    batch, full, cfg, ctx = run["batch"], run["full"], run["trainer"].method.config, run["ctx"]
    scored = batch["completion_mask"].bool()  # [N, L]: the response tokens
    predicting = {k: v[:, :-1][scored[:, 1:]] for k, v in full.items()}  # token t + 1 <- the logits at t
    at_token = {k: v[scored] for k, v in full.items()}  # the official trainer: the logits AT the response tokens
    assert torch.allclose(ctx.scored_logits(), predicting["policy"], atol=1e-4)
    assert torch.allclose(ctx.frozen["dpo"].logits, predicting["dpo"], atol=1e-4)
    assert torch.allclose(ctx.frozen["rev"].logits, predicting["rev"], atol=1e-4)
    assert (at_token["policy"] - predicting["policy"]).abs().max() > 0.1

    def sequence_mean(rows):
        losses = token_losses(rows["policy"], rows["dpo"], rows["rev"], cfg)[0].detach()
        grid = torch.zeros(scored[:, 1:].shape).masked_scatter(scored[:, 1:], losses)
        return (grid.sum(-1) / scored[:, 1:].sum(-1)).mean().item(), losses

    standard, tokens = sequence_mean(predicting)
    _, official_tokens = sequence_mean(at_token)
    assert run["loss"] == pytest.approx(standard, rel=1e-4)
    assert (official_tokens - tokens).abs().max() > 0.1 * tokens.abs().max()  # another number token by token


def test_a_few_steps_bring_the_policy_to_the_teacher(run):
    logs = training_logs(run["trainer"])
    assert logs[0]["loss"] == pytest.approx(run["loss"], rel=1e-5)
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"]  # 3 steps: 0.00836 -> 0.00718
    assert logs[-1]["aligndistil/kl_dpo"] < logs[0]["aligndistil/kl_dpo"]
    assert 1e-3 < logs[0]["aligndistil/weight"] < 2 * 10 + 1e-3


def test_recipe_validates_and_runs_on_cpu(tiny, tmp_path, monkeypatch):
    from trl_plus import check_recipe, load_recipe, train

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/aligndistil.yaml").read_text())
    assert recipe["method"] == "aligndistil" and recipe["model"]["quantization"]["load_in_4bit"]
    assert set(recipe["teachers"]) == {"dpo", "rev"} and all("adapter" in t for t in recipe["teachers"].values())
    # the teacher adapters are trained first (a DPO run each), so the recipe validates with them pointed at real ones
    adapters = [f"teachers.dpo.adapter={tiny['dpo']}", f"teachers.rev.adapter={tiny['rev']}"]
    check_recipe(load_recipe("recipes/aligndistil.yaml", ["data.train.path=recipes/data/quickstart_prefs.jsonl",
                                                          "data.eval=null", *adapters]))  # fmt: skip
    # then trains 2 steps on the CPU as run_recipe_on_cpu does (which validates the recipe as written first)
    result = train("recipes/aligndistil.yaml", [*CPU_OVERRIDES, f"model.name_or_path={tiny['base']}", *adapters,
                                                "data.train.limit=8", f"training.output_dir={tmp_path}"])  # fmt: skip
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    assert not (tmp_path / "teacher_dpo").exists()  # only the trained adapter is saved
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
