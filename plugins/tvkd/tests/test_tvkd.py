"""TVKD: the card's worked examples (code "sum" / "entropy", shaped-DPO), equality with a line-by-line transcription
of the official qadapter code (rest slot, labels outside the top-k, α1 ≠ 0), the reductions (γ = 0 and equal teacher
values: reference-free DPO with β = 1; shaped-DPO γ = 1 and λ = 0: DPO), V after the last token = 0, gradients,
errors, the Needs an instance declares."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_tvkd import TVKD, soft_values, support_probs

from trl_plus import DPO, FrozenOutputs, LossContext, Needs, Teacher, TopK, TrlPlusError
from trl_plus.testing import (
    build_model,
    build_tokenizer,
    logits_head,
    perturb,
    preference_rows,
    run_recipe_on_cpu,
    tiny_trainer,
    train_tiny,
    training_logs,
)

ROOT = Path(__file__).resolve().parents[3]

# The card's example, K = 3, one pair, two response tokens each. The student's full vocabulary is the three top-k ids
# plus one more token (id 3) holding the rest of its mass (0.2 at every position).
STUDENT = [[[[0.5, 0.2, 0.1, 0.2], [0.3, 0.4, 0.1, 0.2]]], [[[0.2, 0.3, 0.3, 0.2], [0.1, 0.1, 0.6, 0.2]]]]
TEACHER = [[[[0.6, 0.2, 0.1], [0.2, 0.6, 0.1]]], [[[0.5, 0.3, 0.1], [0.3, 0.3, 0.2]]]]
LABELS = [[[0, 1]], [[2, 2]]]


def context(student=STUDENT, teacher=TEACHER, labels=LABELS, mask=None, ids=None, ref=None):
    """A ``[2, B, T]`` context whose policy logits are ``log student`` (full softmax = ``student``), the labels'
    log-probs gathered from them (so gradients reach the logits), and the teacher's top-k (ids 0..k-1 unless
    ``ids``)."""
    logits = torch.tensor(student, dtype=torch.float64).log().requires_grad_()
    labels = torch.tensor(labels)
    teacher = torch.tensor(teacher, dtype=torch.float64)
    mask = torch.ones(labels.shape, dtype=torch.float64) if mask is None else torch.tensor(mask, dtype=torch.float64)
    if ids is None:
        ids = torch.arange(teacher.size(-1)).expand(teacher.shape).clone()
    ids = torch.where(mask.bool().unsqueeze(-1), torch.as_tensor(ids), -1)
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
    token_logps.retain_grad()
    frozen = {"teacher": FrozenOutputs(topk_ids=ids, topk_logps=teacher.log() * mask.unsqueeze(-1))}
    ctx = LossContext(token_logps=token_logps, mask=mask, frozen=frozen, labels=labels,
                      head=logits_head(logits), ref_token_logps=ref)  # fmt: skip
    ctx.test_logits = logits  # the leaf, for gradient checks
    return ctx


def test_card_worked_example_sum():
    cfg = TVKD(softvalue="sum", rest_slot=False, top_k=3).config
    teacher = torch.tensor(TEACHER, dtype=torch.float64)
    values = soft_values(None, support_probs(teacher.log(), False).log(), cfg)
    assert values[0, 0].tolist() == pytest.approx([0.2013279, 0.2013279], abs=1e-7)
    assert values[1, 0].tolist() == pytest.approx([0.2196254, 0.1698732], abs=1e-7)
    out = TVKD(softvalue="sum", rest_slot=False, top_k=3).loss(context())
    assert out.rewards[:, 0].tolist() == pytest.approx([-1.8107658, -1.8846716], abs=1e-6)
    assert out.loss.item() == pytest.approx(0.6568769, abs=1e-6)


def test_card_worked_example_entropy():
    cfg = TVKD(softvalue="entropy", rest_slot=False, top_k=3).config
    student = torch.tensor(STUDENT, dtype=torch.float64)[..., :3]
    values = soft_values(support_probs(student.log(), False).log(), None, cfg)
    assert values[0, 0].tolist() == pytest.approx([0.8987197, 0.9579666], abs=1e-7)
    assert values[1, 0].tolist() == pytest.approx([1.0442713, 0.7670124], abs=1e-7)
    out = TVKD(softvalue="entropy", rest_slot=False, top_k=3).loss(context())
    assert out.rewards[:, 0].tolist() == pytest.approx([-2.5674046, -2.4818108], abs=1e-6)
    assert out.loss.item() == pytest.approx(0.7368596, abs=1e-6)


def test_card_worked_example_shaped_dpo():
    # sums ℓθ(y_w) = −3.0, ℓref(y_w) = −3.4, ℓθ(y_l) = −4.0, ℓref(y_l) = −3.9, spread over the two tokens
    policy = torch.tensor([[[-1.5, -1.5]], [[-2.0, -2.0]]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[[-1.7, -1.7]], [[-1.95, -1.95]]], dtype=torch.float64)
    ctx = context(ref=ref)
    ctx.token_logps = policy
    out = TVKD(mode="shaped_dpo", beta=0.1, shaping_weight=1.0, gamma=0.9, rest_slot=False, top_k=3).loss(ctx)
    assert out.metrics["tvkd/shaping_margin"].item() == pytest.approx(-0.2214607 + 0.2366127, abs=1e-7)
    assert out.loss.item() == pytest.approx(0.6611017, abs=1e-7)
    no_shaping = TVKD(mode="shaped_dpo", beta=0.1, shaping_weight=0.0, rest_slot=False, top_k=3).loss(ctx)
    dpo = DPO(beta=0.1).loss(ctx).loss.item()
    assert no_shaping.loss.item() == pytest.approx(0.6684596, abs=1e-7) and dpo == pytest.approx(0.6684596, abs=1e-7)


# -- the official code, transcribed ----------------------------------------------------------------------------


def official_qadapter_loss(student, labels, teacher, ids, alpha_tilde, alpha_0, alpha_1, gamma, softvalue):
    """``scripts/run_distill_dpo.py`` (qadapter branch, loss type "dpo") with ``load_input_and_target_probs_fast`` and
    ``get_compressed_labels`` on one batch: ``student`` [2B, T, V] probabilities, ``labels`` [2B, T] label ids,
    ``teacher`` / ``ids`` [2B, T, k] stored top-k probabilities and ids (``remaining_probs_sum`` = 1 − Σ)."""
    n, length, k = teacher.shape
    extended = torch.cat([student, torch.zeros(n, length, 1, dtype=student.dtype)], -1)
    output_probs = torch.zeros(n, length, k + 1, dtype=student.dtype)
    target_probs = torch.zeros(n, length, k + 1, dtype=student.dtype)
    target_probs[..., :k] = teacher
    target_probs[..., k] = 1 - teacher.sum(-1)
    output_probs[..., :k] = torch.gather(extended, 2, ids)
    output_probs[..., k] = 1 - output_probs[..., :k].sum(-1)
    policy_probs = output_probs.clamp(1e-8, 1 - 1e-8)
    teacher_probs = target_probs.clamp(1e-8, 1 - 1e-8)
    labels_compressed = torch.full_like(labels, -100)
    for b in range(n):
        for t in range(length):
            row = ids[b, t].tolist()
            labels_compressed[b, t] = row.index(labels[b, t].item()) if labels[b, t].item() in row else len(row)
    mask = valid_mask = labels_compressed != -100
    q_values = torch.log(torch.clamp(policy_probs, min=1e-8))
    log_pi_star = torch.log(torch.clamp(teacher_probs, min=1e-8))
    values = alpha_tilde * torch.logsumexp((alpha_1 * q_values + alpha_0 * log_pi_star) / alpha_tilde, dim=-1)
    q_value_ai = torch.gather(q_values, dim=-1, index=labels_compressed.unsqueeze(-1)).squeeze(-1) * valid_mask
    if softvalue == "sum":
        soft_value_t1 = torch.zeros_like(values)
        soft_value_t1[:, :-1] = values[:, 1:]
    else:
        probs = torch.exp(q_values) * valid_mask.unsqueeze(-1)
        entropy = -(probs * q_values).sum(dim=-1)
        soft_value_t1 = torch.zeros_like(entropy)
        soft_value_t1[:, :-1] = entropy[:, 1:]
    soft_value_t1 = soft_value_t1 * valid_mask
    reward = (q_value_ai - gamma * soft_value_t1) * mask
    reward_sum = reward.sum(dim=1)
    bs = reward_sum.shape[0] // 2
    logits = torch.stack([reward_sum[:bs], reward_sum[bs:]], dim=-1)
    return torch.nn.functional.cross_entropy(logits, torch.zeros(bs, dtype=torch.long))


@pytest.mark.parametrize("softvalue, alpha_1", [("sum", 0.0), ("sum", 0.5), ("entropy", 0.0)])
def test_equals_the_official_code_with_its_rest_slot(softvalue, alpha_1):
    # two pairs, three tokens; rejected pair 0 token 2 and chosen pair 1 token 0 have labels outside the top-2
    torch.manual_seed(0)
    student = torch.softmax(torch.randn(2, 2, 3, 5, dtype=torch.float64), -1)
    teacher_full = torch.softmax(2 * torch.randn(2, 2, 3, 5, dtype=torch.float64), -1)
    teacher, ids = teacher_full.topk(2, -1)
    labels = ids[..., 0].clone()
    labels[1, 0, 2] = next(v for v in range(5) if v not in ids[1, 0, 2].tolist())
    labels[0, 1, 0] = next(v for v in range(5) if v not in ids[0, 1, 0].tolist())
    hp = dict(alpha_tilde=0.8, alpha_0=0.7, alpha_1=alpha_1, gamma=0.95)
    ours = TVKD(softvalue=softvalue, top_k=2, alpha_tilde=0.8, alpha=0.7, alpha_1=alpha_1, gamma=0.95).loss(
        context(student.tolist(), teacher.tolist(), labels.tolist(), ids=ids)
    )
    flat = dict(student=student.flatten(0, 1), labels=labels.flatten(0, 1), teacher=teacher.flatten(0, 1),
                ids=ids.flatten(0, 1))  # fmt: skip
    assert ours.loss.item() == pytest.approx(official_qadapter_loss(**flat, **hp, softvalue=softvalue).item(), abs=1e-6)
    assert ours.metrics["tvkd/label_in_topk"].item() == pytest.approx(10 / 12)


def test_label_outside_topk_scores_the_rest_slot_or_log_1e8():
    labels = [[[0, 3]], [[2, 2]]]  # the chosen second token is id 3: outside the teacher's top-3
    rest = TVKD(rest_slot=True, top_k=3).loss(ctx := context(labels=labels))
    floor = TVKD(rest_slot=False, top_k=3).loss(ctx_floor := context(labels=labels))
    base = TVKD(rest_slot=False, top_k=3).loss(context()).rewards[0, 0].item()  # label 1 (0.4) in the top-k
    assert floor.rewards[0, 0].item() == pytest.approx(base - math.log(0.4) + math.log(1e-8), abs=1e-6)
    assert floor.metrics["tvkd/label_in_topk"].item() == 0.75
    # rest slot: log(1 − 0.3 − 0.4 − 0.1) = log 0.2, and the values are over four slots
    values = [math.log(0.6**0.7 + 0.2**0.7 + 0.1**0.7 + 0.1**0.7), math.log(0.2**0.7 + 0.6**0.7 + 0.1**0.7 + 0.1**0.7)]
    assert rest.rewards[0, 0].item() == pytest.approx(math.log(0.5) - values[1] + math.log(0.2), abs=1e-6)
    rest.loss.backward()
    floor.loss.backward()
    assert ctx_floor.test_logits.grad[0, 0, 1].abs().max().item() == 0  # a floored label has no gradient
    assert ctx.test_logits.grad[0, 0, 1].abs().max().item() > 1e-3  # the rest slot has one (through the top-k mass)


def test_gamma_zero_or_equal_teacher_values_is_reference_free_dpo_beta_one():
    for model in (TVKD(gamma=0.0, softvalue="entropy", top_k=3), TVKD(gamma=0.0, top_k=3)):
        ctx = context()
        ctx.ref_token_logps = torch.zeros_like(ctx.token_logps)
        assert model.loss(ctx).loss.item() == pytest.approx(DPO(beta=1.0).loss(ctx).loss.item(), abs=1e-12)
    # "sum" with α1 = 0: teachers whose summed next-state values are equal (the same second-position distribution)
    same = [[[[0.6, 0.2, 0.1], [0.3, 0.3, 0.2]]], [[[0.5, 0.3, 0.1], [0.2, 0.3, 0.3]]]]
    ctx = context(teacher=same)
    ctx.ref_token_logps = torch.zeros_like(ctx.token_logps)
    for rest in (True, False):
        ours = TVKD(top_k=3, rest_slot=rest).loss(ctx).loss.item()
        assert ours == pytest.approx(DPO(beta=1.0).loss(ctx).loss.item(), abs=1e-6)


def test_value_after_the_last_token_is_zero_whatever_pads_follow():
    # the pair padded to four positions: the code would read the padded slot's value for the last token
    student = [[[*STUDENT[0][0], [0.25] * 4, [0.25] * 4]], [[*STUDENT[1][0], [0.25] * 4, [0.25] * 4]]]
    teacher = [[[*TEACHER[0][0], [0.9, 0.05, 0.05], [0.4, 0.4, 0.2]]], [[*TEACHER[1][0], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]]]]
    ctx = context(student, teacher, [[[0, 1, 0, 0]], [[2, 2, 0, 0]]], mask=[[[1, 1, 0, 0]], [[1, 1, 0, 0]]])
    for softvalue, card in (("sum", 0.6568769), ("entropy", 0.7368596)):
        assert TVKD(softvalue=softvalue, rest_slot=False, top_k=3).loss(ctx).loss.item() == pytest.approx(card, abs=1e-6)


def test_gradients_sum_mode_teacher_term_has_none():
    ctx = context()
    out = TVKD(top_k=3, rest_slot=False).loss(ctx)
    out.loss.backward()
    sigma = torch.sigmoid(-(out.rewards[0] - out.rewards[1])).item()
    grad = ctx.token_logps.grad
    assert grad[0, 0].tolist() == pytest.approx([-sigma, -sigma], abs=1e-12)  # uniform over tokens, B = 1
    assert grad[1, 0].tolist() == pytest.approx([sigma, sigma], abs=1e-12)
    # the logits get exactly the label log-probs' gradient (∂ log softmax): the values give nothing
    reference = context()
    (grad * reference.token_logps).sum().backward()
    assert torch.allclose(ctx.test_logits.grad, reference.test_logits.grad, atol=1e-12)


def test_gradients_entropy_mode_flow_through_the_student_values():
    ctx = context()
    TVKD(top_k=3, softvalue="entropy", rest_slot=False).loss(ctx).loss.backward()
    label_only = context()
    (ctx.token_logps.grad * label_only.token_logps).sum().backward()
    extra = ctx.test_logits.grad - label_only.test_logits.grad
    assert extra[:, :, 0].abs().max() < 1e-12  # V(s_1) never enters (only next states)
    assert extra[:, :, 1].abs().max() > 1e-3  # the entropy at s_2 does


def test_shaped_dpo_gamma_one_telescopes_to_dpo():
    # γ = 1: S(y) = −Φ(s_1), and s_1 (the prompt) is the same state for both responses — any later teacher values
    torch.manual_seed(1)
    teacher = torch.softmax(torch.randn(2, 3, 4, 6, dtype=torch.float64), -1)[..., :4]
    teacher[1, :, 0] = teacher[0, :, 0]
    policy = -torch.rand(2, 3, 4, dtype=torch.float64)
    ref = -torch.rand(2, 3, 4, dtype=torch.float64)
    ctx = context(torch.full((2, 3, 4, 5), 0.2).tolist(), teacher.tolist(), torch.zeros(2, 3, 4, dtype=torch.long).tolist(),
                  ref=ref)  # fmt: skip
    ctx.token_logps = policy
    for rest in (True, False):
        ours = TVKD(mode="shaped_dpo", gamma=1.0, beta=0.3, shaping_weight=2.0, rest_slot=rest, top_k=4).loss(ctx)
        assert ours.loss.item() == pytest.approx(DPO(beta=0.3).loss(ctx).loss.item(), abs=1e-12)
        shaped = TVKD(mode="shaped_dpo", gamma=0.9, beta=0.3, shaping_weight=2.0, rest_slot=rest, top_k=4).loss(ctx)
        assert abs(shaped.loss.item() - ours.loss.item()) > 1e-4


def test_needs_follow_the_config():
    assert TVKD().needs.teachers == {"teacher": TopK(50)} and TVKD.needs == TVKD().needs
    assert TVKD().needs.reference == "no" and TVKD().needs.scored_logits
    assert TVKD(top_k=20).needs.teachers == {"teacher": TopK(20)}
    shaped = TVKD(mode="shaped_dpo").needs
    assert shaped == Needs(reference="yes", teachers={"teacher": TopK(50)})


def test_clear_errors():
    with pytest.raises(ValidationError, match="shaped_dpo"):
        TVKD(mode="shaped_dpo", softvalue="entropy")
    with pytest.raises(ValidationError, match="shaped_dpo"):
        TVKD(mode="shaped_dpo", alpha_1=0.5)
    with pytest.raises(ValidationError):
        TVKD(gamma=1.5)
    with pytest.raises(ValidationError):
        TVKD(qadapter_alpha=0.7)
    ctx = context()
    with pytest.raises(TrlPlusError, match="top-3 .* top_k is 50") as err:
        TVKD().loss(ctx)
    assert "\n" not in str(err.value)
    ctx.frozen = {}
    with pytest.raises(TrlPlusError, match="teachers.teacher"):
        TVKD(top_k=3).loss(ctx)
    ctx = context()
    ctx.labels = None
    with pytest.raises(TrlPlusError, match="label ids"):
        TVKD(top_k=3).loss(ctx)


# -- through the trainer ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_PLUS_CACHE", str(tmp_path / "cache"))


def teacher_model():
    """A tiny teacher that is not the student (other seeded weights), on the student's tokenizer."""
    return build_model(build_tokenizer(), seed=1).eval()


class Spy(TVKD):
    """TVKD that keeps the contexts its loss saw."""

    seen: list = []

    def loss(self, ctx):
        self.seen.append(ctx)
        return super().loss(ctx)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps of TVKD as TVKD.yaml runs it ("entropy") on one batch, the teacher's top-8 precomputed; and the
    teacher."""
    import os

    os.environ["TRL_PLUS_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # the module's own column cache
    teacher = teacher_model()
    trainer = train_tiny(Spy(top_k=8, softvalue="entropy"), tmp_path_factory.mktemp("tvkd"), rows=preference_rows(8),
                         teachers={"teacher": Teacher(teacher, mode="precomputed", identity="seed 1")}, max_steps=3)
    return trainer, teacher


def test_precomputed_top_k_equals_the_live_teacher(trained):
    trainer, teacher = trained
    assert "frozen_teacher_topk_ids" in trainer.train_dataset.column_names
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    with torch.no_grad():
        trainer.model.eval()
        trainer.compute_loss(trainer.model, batch)
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    ctx = Spy.seen[-1]
    top = trainer.to_grid(batch, logits.float().log_softmax(-1)).topk(8, -1)
    where = ctx.mask.bool()
    stored = ctx.frozen["teacher"]
    assert torch.equal(stored.topk_ids[where], top.indices[where])
    assert torch.allclose(stored.topk_logps[where], top.values[where], atol=1e-6)
    assert (stored.topk_ids[~where] == -1).all()
    assert torch.equal(ctx.labels, trainer.to_grid(batch, batch["input_ids"][:, 1:]))  # the label ids


def test_a_few_steps_raise_the_margin(trained):
    logs = training_logs(trained[0])
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 1.0
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert 0 < logs[0]["tvkd/label_in_topk"] < 1


def test_shaped_dpo_gamma_one_is_dpo_through_the_trainer(tmp_path):
    trainer = tiny_trainer("tvkd", tmp_path, {"mode": "shaped_dpo", "gamma": 1.0, "top_k": 5}, rows=preference_rows(8),
                           teachers={"teacher": teacher_model()})  # a live teacher  # fmt: skip
    perturb(trainer.model)  # the policy leaves the reference
    trainer.model.eval()
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(8)])
    losses = {}
    with torch.no_grad():
        for name, method in [("telescoped", trainer.method), ("discounted", TVKD(mode="shaped_dpo", gamma=0.5, top_k=5)),
                             ("dpo", DPO(beta=0.1))]:  # the same trainer, weights, reference and batch
            trainer.method = method
            losses[name] = trainer.compute_loss(trainer.model, batch).item()
    assert abs(losses["dpo"] - math.log(2)) > 1e-3
    assert losses["telescoped"] == pytest.approx(losses["dpo"], abs=1e-6)
    assert abs(losses["discounted"] - losses["dpo"]) > 1e-3


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/tvkd.yaml").read_text())
    assert recipe["method"] == "tvkd" and recipe["model"]["quantization"]["load_in_4bit"]
    assert recipe["teachers"]["teacher"]["mode"] == "precomputed"
    result = run_recipe_on_cpu("recipes/tvkd.yaml", tmp_path, "teachers.teacher.name_or_path=tiny-llama",
                               "teachers.teacher.quantization=null", "teachers.teacher.dtype=float32",
                               "data.train.limit=8")  # fmt: skip
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]
