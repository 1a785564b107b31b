"""ranking-accuracy: the card's worked example, Theorem 4.1's iff on random inputs, the card's properties, and one run
through the trainer's metric runner."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from trl_plus_ranking_accuracy import RankingAccuracy, idealized_correct, idealized_log_ratio, ranking_correct

from trl_plus import LossContext, get_registry
from trl_plus.testing import make_context, preference_rows, run_metric, tiny_trainer

# The card's worked example (β = 0.1; sums of log-probs): per pair ℓθ(y_w), ℓθ(y_l), ℓref(y_w), ℓref(y_l).
CARD = [(-19.0, -18.5, -20.0, -18.0), (-29.0, -36.0, -30.0, -35.0)]
CARD_ALPHA = [0.8, 0.6]


def card_context(alpha=None, lengths=None):
    """The card's pairs as a context: one token per sequence, or ``lengths`` = [(|y_w|, |y_l|), ...] equal tokens."""
    lengths = lengths or [(1, 1)] * len(CARD)

    def tokens(total, n):
        return [total / n] * n

    policy = [[tokens(p[0], n[0]) for p, n in zip(CARD, lengths)], [tokens(p[1], n[1]) for p, n in zip(CARD, lengths)]]
    ref = [[tokens(p[2], n[0]) for p, n in zip(CARD, lengths)], [tokens(p[3], n[1]) for p, n in zip(CARD, lengths)]]
    batch = {} if alpha is None else {"alpha": torch.tensor(alpha, dtype=torch.float64)}
    return make_context(policy, ref, requires_grad=False, batch=batch)


def summary_of(metric, *contexts):
    """The metric's summary over the examples of ``contexts``, as the runner gathers them (one tensor per example)."""
    values: dict[str, list] = {}
    for ctx in contexts:
        for key, value in metric.batch(ctx).items():
            values.setdefault(key, []).extend(value)
    values["index"] = [torch.tensor(i) for i in range(len(values["correct"]))]
    return metric.summarize(values), values


def test_card_worked_example():
    metric = RankingAccuracy(beta=0.1)
    summary, values = summary_of(metric, card_context(CARD_ALPHA))
    assert [v.item() for v in values["correct"]] == [0.0, 1.0]
    assert summary["accuracy"] == pytest.approx(0.5, abs=1e-12)
    assert [v.item() for v in values["c"]] == [2.0, -5.0]
    assert values["tau"][0].item() == pytest.approx(0.5981389, abs=1e-6)
    assert values["tau"][1].item() == pytest.approx(0.9740770, abs=1e-6)
    assert values["dpo_loss"][0].item() == pytest.approx(0.6209570, abs=1e-6)  # > τ: R = 0
    assert values["dpo_loss"][1].item() == pytest.approx(0.5981389, abs=1e-6)  # ≤ τ: R = 1
    assert summary["idealized_accuracy/beta_0.1"] == 1.0
    assert summary["idealized_accuracy/beta_1"] == 0.5
    ref = torch.tensor([p[2] for p in CARD], dtype=torch.float64), torch.tensor([p[3] for p in CARD], dtype=torch.float64)
    ratios = idealized_log_ratio(*ref, torch.tensor(CARD_ALPHA, dtype=torch.float64), (0.1, 1.0)).exp()
    assert ratios[:, 0].tolist() == pytest.approx([141909.3, 8558.251], rel=1e-6)
    assert ratios[:, 1].tolist() == pytest.approx([0.5413411, 222.6197], rel=1e-6)
    grid = [summary[f"idealized_accuracy/beta_{b:g}"] for b in metric.config.betas]
    assert summary["idealized_accuracy/min"] == min(grid) and summary["idealized_accuracy/max"] == max(grid)
    assert summary["idealized_accuracy/median"] == sorted(grid)[2]
    assert summary["alignment_gap"] == pytest.approx(summary["idealized_accuracy/median"] - 0.5, abs=1e-12)


def test_card_length_normalised_flip():
    """Pair 1 with |y_w| = 10, |y_l| = 6: −1.9 vs −3.083333 per token, so R̃ = 1 where R = 0."""
    _, values = summary_of(RankingAccuracy(), card_context(lengths=[(10, 6), (1, 1)]))
    assert values["correct"][0].item() == 0.0
    assert values["correct_normalized"][0].item() == 1.0
    mean = values["logps"][0] / values["lengths"][0]
    assert mean.tolist() == pytest.approx([-1.9, -3.083333], abs=1e-6)


def random_context(n, generator, integer=False):
    """``n`` random pairs of 1-6 tokens each (log-probs in (-3, 0), or integers in -3..0 so that exact ties occur)."""
    lengths = torch.randint(1, 7, (2, n), generator=generator)
    mask = (torch.arange(6)[None, None] < lengths[..., None]).double()

    def draw():
        if integer:
            return -torch.randint(0, 4, (2, n, 6), generator=generator).double() * mask
        return -3 * torch.rand(2, n, 6, generator=generator, dtype=torch.float64) * mask

    return LossContext(token_logps=draw(), mask=mask, ref_token_logps=draw())


@pytest.mark.parametrize("integer", [False, True], ids=["continuous", "integer-ties"])
def test_theorem_4_1_iff_on_random_inputs(integer):
    """R = 1 ⇔ L_DPO ≤ softplus(−βc), for any policy, reference and β (2,000 random pairs per β)."""
    generator = torch.Generator().manual_seed(0)
    for beta in (0.01, 0.1, 0.5, 1.0, 3.0):
        values = RankingAccuracy(beta=beta).batch(random_context(2000, generator, integer))
        correct = values["correct"] == 1
        assert torch.equal(correct, values["dpo_loss"] <= values["tau"])
        if integer:  # boundary cases ℓθ(y_w) = ℓθ(y_l) are drawn: R = 1 and L_DPO = τ exactly
            assert ((values["logps"][:, 0] == values["logps"][:, 1]) & correct).any()


def test_policy_equal_to_reference():
    generator = torch.Generator().manual_seed(1)
    ctx = random_context(500, generator)
    ctx.ref_token_logps = ctx.token_logps.clone()
    summary, values = summary_of(RankingAccuracy(), ctx)
    assert torch.allclose(torch.stack(values["dpo_loss"]), torch.full((500,), math.log(2), dtype=torch.float64),
                          atol=1e-12, rtol=0)  # fmt: skip
    assert summary["accuracy"] == summary["reference_accuracy"]
    assert summary["correct_to_incorrect"] == summary["incorrect_to_correct"] == 0.0


def test_ranking_accuracy_is_invariant_to_beta_and_equal_lengths_normalise_alike():
    generator = torch.Generator().manual_seed(2)
    ctx = random_context(300, generator)
    a, b = RankingAccuracy(beta=0.01).batch(ctx), RankingAccuracy(beta=10.0).batch(ctx)
    assert torch.equal(a["correct"], b["correct"]) and not torch.equal(a["tau"], b["tau"])
    same = ctx.lengths[0] == ctx.lengths[1]
    assert same.sum() > 20
    assert torch.equal(a["correct"][same], a["correct_normalized"][same])


def test_idealized_accuracy_is_monotone_in_beta_when_the_reference_is_wrong():
    """α > 0.5 and c > 0 (the reference prefers y_l): a smaller β gives a larger R*; α = 0.5 gives the reference's
    own log-ratio."""
    generator = torch.Generator().manual_seed(3)
    n = 1000
    ref_chosen = -20 * torch.rand(n, generator=generator, dtype=torch.float64)
    ref_rejected = ref_chosen + 5 * torch.rand(n, generator=generator, dtype=torch.float64)  # c > 0
    alpha = 0.5 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    betas = (0.01, 0.1, 1.0, 5.0, 10.0)
    per_beta = idealized_correct(ref_chosen, ref_rejected, alpha, betas).mean(0).tolist()
    assert per_beta == sorted(per_beta, reverse=True) and per_beta[0] > per_beta[-1]
    tie = idealized_log_ratio(ref_chosen, ref_rejected, torch.full((n,), 0.5, dtype=torch.float64), betas)
    assert torch.equal(tie, (ref_chosen - ref_rejected)[:, None].expand(n, len(betas)))
    assert idealized_correct(ref_chosen, ref_rejected, torch.full((n,), 0.5), betas).isnan().all()  # ties left out


def test_rater_ties_and_reversed_pairs():
    """α = 0.5: right iff |πθ(y_w) − πθ(y_l)| < 0.01 on probabilities; α < 0.5: the rejected one should win."""
    chosen = torch.tensor([-20.0, math.log(0.5), -1.0, -1.0, -2.0], dtype=torch.float64)
    rejected = torch.tensor([-25.0, math.log(0.2), -2.0, -2.0, -1.0], dtype=torch.float64)
    alpha = torch.tensor([0.5, 0.5, 0.3, math.nan, 0.9], dtype=torch.float64)
    assert ranking_correct(chosen, rejected, alpha).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_without_alpha_there_is_no_idealized_accuracy():
    summary, _ = summary_of(RankingAccuracy(), card_context())
    assert summary["accuracy"] == 0.5 and "ties" not in summary
    assert not any(key.startswith(("idealized", "alignment_gap")) for key in summary)


def test_through_the_metric_runner(tmp_path):
    """The registered metric on the tiny trainer: the same sequence log-probs as the core's `pairs` metric, R with ≥,
    policy == reference before training, and the per-pair CSV."""
    rows = [dict(row, alpha=a) for row, a in zip(preference_rows(8, seed=4), [0.9, 0.7, 0.6, 1.0, 0.5, 0.8, 0.3, 0.75])]
    trainer = tiny_trainer("dpo", tmp_path / "run", max_steps=1, training={"per_device_eval_batch_size": 3})
    metric = get_registry().get_metric("ranking-accuracy")()
    result = run_metric(metric, trainer, rows, tmp_path / "out")
    pairs = run_metric(get_registry().get_metric("pairs")(), trainer, rows)
    logps, ref = torch.stack(result.values["logps"]), torch.stack(result.values["ref_logps"])
    assert torch.equal(logps, torch.stack(pairs.values["logps"]))
    assert torch.equal(ref, torch.stack(pairs.values["ref_logps"]))
    alpha = torch.tensor([row["alpha"] for row in rows], dtype=torch.float64)
    assert result.summary["accuracy"] == ranking_correct(logps[:, 0], logps[:, 1], alpha).mean().item()
    assert result.summary["reference_accuracy"] == result.summary["accuracy"]  # not trained: policy == reference
    assert result.summary["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.summary["ties"] == 1 / 8
    assert {"idealized_accuracy/median", "alignment_gap", "normalized_alignment_gap"} <= set(result.summary)
    (path,) = result.artefacts
    table = list(csv.DictReader(path.open()))
    assert sorted(int(r["index"]) for r in table) == list(range(8))
    taus = [float(r["tau"]) for r in table]
    assert taus == sorted(taus)  # hardest first
