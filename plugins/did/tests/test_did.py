"""DID entropy: the card's worked example (token proxy, V = 4), the distribution's properties, the metric on a
hand-made context, and through the real trainer: policy == reference gives log V exactly, training moves it."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from trl_plus_did import DID, did_distribution, did_entropy

from trl_plus import FrozenOutputs, PlusTrainer  # noqa: F401 (the trainer's import at collection, not in a test)
from trl_plus.testing import logits_head, make_context, preference_rows, run_metric, tiny_trainer

# The card's worked example 2 (shared/methods/did.md): two positions, V = 4.
POLICY = [[1.5, 0.2, -0.4, 0.0], [0.0, 0.6, -0.2, -0.3]]
REFERENCE = [[1.0, 0.5, -0.5, 0.0], [0.2, 0.1, 0.0, -0.3]]
Q = [[0.3668137, 0.1648200, 0.2458826, 0.2224837], [0.1910163, 0.3846596, 0.1910163, 0.2333078]]
H = [1.344352, 1.339473]
H_MEAN = 1.341913


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_the_cards_token_proxy_example():
    assert torch.allclose(did_distribution(t(POLICY), t(REFERENCE)), t(Q), atol=1e-6, rtol=0)
    entropy = did_entropy(t(POLICY), t(REFERENCE))
    assert torch.allclose(entropy, t(H), atol=1e-6, rtol=0)
    assert entropy.mean().item() == pytest.approx(H_MEAN, abs=1e-6)
    assert entropy.max().item() < math.log(4)


def test_q_is_a_distribution_invariant_to_constants_and_bounded():
    generator = torch.Generator().manual_seed(0)
    z, z_ref = torch.randn(7, 11, generator=generator, dtype=torch.float64), torch.randn(7, 11, generator=generator,
                                                                                      dtype=torch.float64)  # fmt: skip
    q = did_distribution(z, z_ref)
    assert torch.allclose(q.sum(-1), torch.ones(7, dtype=torch.float64), atol=1e-12, rtol=0)
    shift = torch.randn(7, 1, generator=generator, dtype=torch.float64)  # a constant per position, either model
    entropy = did_entropy(z, z_ref)
    assert torch.allclose(did_entropy(z + shift, z_ref), entropy, atol=1e-12, rtol=0)
    assert torch.allclose(did_entropy(z, z_ref - 3 * shift), entropy, atol=1e-12, rtol=0)
    assert bool((entropy > 0).all()) and bool((entropy < math.log(11)).all())
    # policy == reference: uniform, log V; the ratio concentrated on one token: H -> 0; chunking changes nothing
    assert torch.allclose(did_entropy(z, z), torch.full((7,), math.log(11), dtype=torch.float64), atol=1e-12, rtol=0)
    peaked = z_ref.clone()
    peaked[:, 3] += 60.0
    assert did_entropy(peaked, z_ref).max().item() < 1e-20
    assert torch.allclose(did_entropy(z, z_ref, chunk=2), entropy, atol=0, rtol=0)
    with pytest.raises(ValueError, match="tokenizer"):
        did_entropy(z, z_ref[:, :5])


def values_of(metric, ctx):
    """What the runner collects from one batch: one tensor per example per key, and the row indices."""
    values = {key: list(value) for key, value in metric.batch(ctx).items()}
    values["index"] = [torch.tensor(i) for i in range(ctx.batch_size)]
    return values


def test_the_metric_on_a_hand_made_context_reads_logits_at_scored_positions_only():
    # one pair: the chosen response is the card's example, the rejected one has policy == reference (log 4)
    policy = torch.tensor([[POLICY], [REFERENCE]], dtype=torch.float64)  # [K=2, B=1, T=2, V=4]
    reference = torch.tensor([REFERENCE, REFERENCE], dtype=torch.float64).reshape(-1, 4)  # [M=4, V], scored order
    labels = torch.tensor([[[0, 1]], [[2, 3]]])
    ctx = make_context([[[-1.0, -2.0]], [[-1.5, -0.5]]], head=logits_head(policy), labels=labels,
                       frozen={"reference": FrozenOutputs(logits=reference)})  # fmt: skip
    metric = DID()
    values = values_of(metric, ctx)
    assert values["entropy_chosen"][0].item() == pytest.approx(H_MEAN, abs=1e-6)
    assert values["entropy_rejected"][0].item() == pytest.approx(math.log(4), abs=1e-6)
    # the reference's label log-probs come from its logits (one reference forward, not two)
    ref = torch.log_softmax(reference, -1)[torch.arange(4), labels.flatten()]
    assert values["log_ratio_chosen"][0].item() == pytest.approx(-3.0 - (ref[0] + ref[1]).item(), abs=1e-12)
    assert values["log_ratio_rejected"][0].item() == pytest.approx(-2.0 - (ref[2] + ref[3]).item(), abs=1e-12)
    summary = metric.summarize(values)
    assert summary["entropy/chosen"] == pytest.approx(H_MEAN, abs=1e-6)
    assert summary["entropy"] == pytest.approx((H_MEAN + math.log(4)) / 2, abs=1e-6)
    assert summary["max_entropy"] == pytest.approx(math.log(4), abs=1e-12)


def test_policy_equal_to_reference_gives_log_v_exactly_and_training_lowers_it(tmp_path):
    rows = preference_rows(4, seed=3)
    trainer = tiny_trainer("dpo", tmp_path / "run", rows=preference_rows(4), max_steps=2, learning_rate=2e-2,
                           training={"per_device_train_batch_size": 4, "max_length": 64})  # fmt: skip
    before = run_metric(DID(), trainer, rows, tmp_path / "before")
    vocab = trainer.model.config.vocab_size
    assert before.summary["max_entropy"] == math.log(vocab)
    for key in ("entropy_chosen", "entropy_rejected"):  # the reference is a deep copy of the untrained policy
        assert max(abs(v.item() - math.log(vocab)) for v in before.values[key]) < 1e-9
    assert before.summary["entropy"] == pytest.approx(math.log(vocab), abs=1e-9)
    [path] = before.artefacts
    with open(path) as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in table] == list(range(len(rows)))
    assert all(float(r["tokens_chosen"]) > 0 for r in table)

    trainer.train()
    after = run_metric(DID(), trainer, rows)
    assert after.summary["entropy"] < before.summary["entropy"] - 1e-4  # the DID moved away from uniform
    assert after.summary["entropy/chosen"] < math.log(vocab)
