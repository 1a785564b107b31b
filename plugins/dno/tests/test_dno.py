"""DNO: the card's worked example (Eq. 8 soft targets and DNO-Prct), z = 1 is DPO, symmetry, the gradient, the
paper's large-margin pair rules on the card's score lists, win-rate targets, automatic negatives, and an iterated
recipe (K samples + gold, replay) on the tiny model whose generation-side reward rises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trl_plus_dno import DNO, repeats, win_rates

from trl_plus import DPO, Rollouts
from trl_plus.testing import iteration_firsts, make_context, tiny_recipe

ROOT = Path(__file__).resolve().parents[3]
POLICY = [[[-12.0], [-20.0]], [[-15.0], [-18.0]]]  # ℓθ(y1), ℓθ(y2) for 2 pairs
REFERENCE = [[[-13.0], [-19.0]], [[-14.0], [-18.5]]]
Z = [1 / (1 + math.exp(-(0.8 - 0.2))), 1 / (1 + math.exp(-(0.4 - 0.5)))]  # σ(r_t(y1) − r_t(y2))


def ctx(policy=POLICY, reference=REFERENCE, z=Z):
    return make_context(policy, reference, batch={"target": torch.tensor(z, dtype=torch.float64)})


def test_card_worked_example():
    assert Z == pytest.approx([0.645656, 0.475021], abs=1e-6)
    c = ctx()
    out = DNO(target="soft").loss(c)
    assert out.loss.item() == pytest.approx(0.680609, abs=1e-6)
    per_pair = [DNO(target="soft").loss(ctx([[s[i]] for s in POLICY], [[s[i]] for s in REFERENCE], [Z[i]])).loss.item()
                for i in range(2)]  # fmt: skip
    assert per_pair == pytest.approx([0.669008, 0.692210], abs=1e-6)
    out.loss.backward()
    assert c.token_logps.grad[0].flatten().tolist() == pytest.approx([-0.00479111, -0.000622530], abs=1e-8)
    delta = torch.tensor([0.2, -0.15], dtype=torch.float64)  # −η(z − σ(Δ))/B
    assert c.token_logps.grad[0].flatten().tolist() == pytest.approx(
        (-0.1 * (torch.tensor(Z, dtype=torch.float64) - delta.sigmoid()) / 2).tolist(), abs=1e-12)  # fmt: skip
    prct = DNO().loss(ctx())  # DNO-Prct: z = 1, the default
    assert prct.loss.item() == pytest.approx(0.684548, abs=1e-6)
    assert torch.allclose(prct.rewards, 0.1 * torch.tensor([[1.0, -1.0], [-1.0, 0.5]], dtype=torch.float64))


def test_hard_targets_are_dpo_soft_ones_are_symmetric_and_ln2_at_the_start():
    for eta in (0.05, 0.1, 0.5):
        assert DNO(beta=eta).loss(ctx()).loss.item() == pytest.approx(DPO(beta=eta).loss(ctx()).loss.item(), abs=1e-6)
        assert DNO(beta=eta, target="soft").loss(ctx(z=[1.0, 1.0])).loss.item() == pytest.approx(
            DPO(beta=eta).loss(ctx()).loss.item(), abs=1e-6)  # fmt: skip
    swapped = DNO(target="soft").loss(ctx(POLICY[::-1], REFERENCE[::-1], [1 - z for z in Z])).loss.item()
    assert swapped == pytest.approx(0.680609, abs=1e-6)
    assert DNO(target="soft").loss(ctx(POLICY, POLICY)).loss.item() == pytest.approx(math.log(2), abs=1e-12)
    # z = ½ is minimised at Δ = 0: the gradient there is zero, and a gap in either direction costs more
    flat = ctx([[[-5.0]], [[-5.0]]], [[[-5.0]], [[-5.0]]], [0.5])
    DNO(target="soft").loss(flat).loss.backward()
    assert flat.token_logps.grad.abs().max().item() == 0.0
    for gap in (-3.0, 3.0):
        assert DNO(target="soft").loss(ctx([[[-5.0 + gap]], [[-5.0]]], [[[-5.0]], [[-5.0]]], [0.5])).loss.item() > \
            math.log(2)  # fmt: skip


def rollouts(groups: list[list[float]], texts: list[list[str]] | None = None) -> Rollouts:
    """Hand-made candidates: per group K students then one gold (its last score); completion ids [10·g + k]."""
    group = [g for g, scores in enumerate(groups) for _ in scores]
    source = [s for scores in groups for s in ["policy"] * (len(scores) - 1) + ["column:gold"]]
    ids = [[10 * g + k] for g, scores in enumerate(groups) for k in range(len(scores))]
    n = len(group)
    completions = [t for row in texts for t in row] if texts else [""] * n
    return Rollouts(prompt_ids=[[100 + g] for g in group], completion_ids=ids, prompts=[""] * n,
                    completions=completions, group=torch.tensor(group), source=source,
                    scores=torch.tensor([v for s in groups for v in s], dtype=torch.float64).unsqueeze(-1),
                    weights=torch.ones(1), eos=torch.ones(n, dtype=torch.bool), lengths=torch.ones(n))  # fmt: skip


def pairs(rows, g=0):
    names = ["s0", "s1", "s2", "s3", "s4", "gold"]
    return [(names[r["chosen_ids"][0] - 10 * g], names[r["rejected_ids"][0] - 10 * g]) for r in rows]


def test_the_papers_pair_rules_on_the_cards_scores():
    rows = DNO().make_examples(rollouts([[6, 5, 3, 4, 2, 5]]))
    assert pairs(rows) == [("s0", "s1"), ("s0", "s2"), ("s0", "s3"), ("s0", "s4"), ("s0", "gold"), ("s1", "s2"),
                           ("s1", "s3"), ("s1", "s4"), ("gold", "s2"), ("gold", "s4")]  # fmt: skip
    rows = DNO().make_examples(rollouts([[4, 3, 3, 2, 1, 6]]))
    assert pairs(rows) == [("gold", "s0"), ("gold", "s1"), ("gold", "s2"), ("gold", "s3"), ("gold", "s4")]
    assert DNO().make_examples(rollouts([[4, 4, 3, 3, 2, 4]])) == []  # no positive ≥ 5: the prompt gives nothing
    assert {r["prompt_ids"][0] for r in DNO().make_examples(rollouts([[6, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 6]]))} == \
        {100, 101}  # fmt: skip


def test_targets_are_win_rate_sigmoids_and_repetitive_samples_are_automatic_negatives():
    assert win_rates([6, 5, 3, 4, 2, 5]) == pytest.approx([1.0, 0.7, 0.2, 0.4, 0.0, 0.7])
    rows = DNO().make_examples(rollouts([[6, 5, 3, 4, 2, 5]]))
    assert rows[0]["target"] == pytest.approx(1 / (1 + math.exp(-(1.0 - 0.7))))  # s0 ≻ s1
    assert repeats("a b a b a b", 2) == 3 and repeats("a b", 3) == 0
    texts = [["good answer", "x y x y x y x y", "fine", "ok", "meh", "gold"]]
    plain = pairs(DNO().make_examples(rollouts([[6, 6, 5.5, 5.5, 5.5, 5]], texts)))
    assert ("s0", "s1") not in plain and ("s1", "s2") not in plain  # equal scores / margin 0.5: no pair
    flagged = pairs(DNO(repeat_ngram=2, max_repeats=2).make_examples(rollouts([[6, 6, 5.5, 5.5, 5.5, 5]], texts)))
    assert ("s0", "s1") in flagged and ("gold", "s1") in flagged  # s1 repeats "x y" 4 times: a negative for all
    assert not any(chosen == "s1" for chosen, _ in flagged)


def dno_recipe(tmp_path: Path) -> str:
    rows = [{"prompt": f"Count to {i}:", "gold": "7777777777"} for i in range(24)]
    return tiny_recipe(tmp_path, "dno", rows, method_args={"beta": 0.1, "positive_min": 2.0},
                       rollout={"n": 4, "decoding": {"max_new_tokens": 10, "temperature": 1.0},
                                "scorers": [{"name": "digits"}]},
                       iterations={"count": 3, "replay": [0.3, 0.15]}, training={"max_steps": 4})  # fmt: skip


def test_an_iterated_dno_run_raises_its_samples_reward_and_replays_earlier_pairs(tmp_path):
    from trl_plus import train

    result = train(dno_recipe(tmp_path))
    run = Path(result.output_dir)
    firsts = iteration_firsts(run)
    assert all(first["loss"] == pytest.approx(math.log(2), abs=1e-6) for first in firsts)  # promoted reference
    rewards = [first["rollout/reward_policy"] for first in firsts]  # the K samples' digits
    print("sample reward per iteration", rewards)
    assert rewards[2] - rewards[0] > 2.0, rewards  # measured 1.28 -> 2.81 -> 8.19 (of 10 digits)
    made = [len((run / f"iter-{t}" / "rows.jsonl").read_text().splitlines()) for t in (1, 2, 3)]
    replay = [json.loads((run / f"iter-{t}" / "replay.json").read_text())["rows"] for t in (1, 2, 3)]
    assert replay[0] == [] and len(replay[1]) == round(0.3 * made[0])
    assert len(replay[2]) == round(0.3 * made[1]) + round(0.15 * made[0])


def test_the_recipe_validates():
    from trl_plus import check_recipe, load_recipe

    recipe = load_recipe(ROOT / "recipes/dno.yaml")
    assert recipe.method == "dno" and recipe.iterations.replay == [0.3, 0.15] and recipe.rollout.scorers
    check_recipe(recipe)
