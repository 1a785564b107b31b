"""SELM: the card's worked example (both settings), α = 0 is DPO, the optimism gradient, the refresh (greedy own
answer + dataset chosen/rejected ranked by a scorer), three-sequence collation, and an iterated recipe on the tiny
model whose generation-side reward rises."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from trl_plus_selm import SELM

from trl_plus import DPO, Rollouts, TrlPlusError
from trl_plus.testing import iteration_firsts, make_context, tiny_recipe

ROOT = Path(__file__).resolve().parents[3]

# The card's worked example (sequence sums as one-token sequences): [chosen, rejected, y_ref] x 2 examples.
POLICY = [[[-12.0], [-20.0]], [[-15.0], [-18.0]], [[-30.0], [-25.0]]]
REFERENCE = [[[-13.0], [-19.0]], [[-14.0], [-18.5]], [[-31.5], [-24.0]]]


def per_example(method, policy=POLICY, reference=REFERENCE):
    return [method.loss(make_context([[s[i]] for s in policy], [[s[i]] for s in reference])).loss.item()
            for i in range(2)]  # fmt: skip


def test_card_worked_example():
    ctx = make_context(POLICY, REFERENCE)
    out = SELM(beta=0.1, alpha=1.0).loss(ctx)
    assert out.loss.item() == pytest.approx(0.709548, abs=1e-6)
    assert per_example(SELM(beta=0.1, alpha=1.0)) == pytest.approx([0.748139, 0.670957], abs=1e-6)
    out.loss.backward()
    grad = ctx.token_logps.grad[:, :, 0]
    assert grad[2].tolist() == pytest.approx([0.05, 0.05], abs=1e-12)  # ∂L/∂ℓθ(y_ref) = αβ/B
    assert grad[0].tolist() == pytest.approx([-0.0225083, -0.0268715], abs=1e-7)  # chosen up
    assert (grad[1] > 0).all()  # rejected down
    assert torch.allclose(out.rewards, 0.1 * torch.tensor([[1.0, -1.0], [-1.0, 0.5]], dtype=torch.float64))
    # the official defaults β = 0.01, α = 0.001
    assert SELM().loss(make_context(POLICY, REFERENCE)).loss.item() == pytest.approx(0.691939, abs=1e-6)
    assert per_example(SELM()) == pytest.approx([0.683212, 0.700665], abs=1e-6)


def test_alpha_zero_is_dpo_and_the_defaults_are_the_official_configs():
    assert (SELM.Config().beta, SELM.Config().alpha) == (0.01, 0.001)
    for beta in (0.01, 0.1, 0.5):
        selm = SELM(beta=beta, alpha=0.0).loss(make_context(POLICY, REFERENCE)).loss.item()
        dpo = DPO(beta=beta).loss(make_context(POLICY[:2], REFERENCE[:2])).loss.item()
        assert selm == pytest.approx(dpo, abs=1e-6)
    with pytest.raises(ValueError):
        SELM(alpha=-1.0)


def test_the_optimism_gradient_is_alpha_beta_over_b_whatever_the_pair_and_shifts_cancel():
    torch.manual_seed(0)
    for _ in range(3):
        policy = (torch.randn(3, 4, 1) * 5).tolist()
        ctx = make_context(policy, (torch.randn(3, 4, 1) * 5).tolist())
        SELM(beta=0.2, alpha=0.3).loss(ctx).loss.backward()
        assert ctx.token_logps.grad[2].flatten().tolist() == pytest.approx([0.2 * 0.3 / 4] * 4, abs=1e-12)
    shifted_p = [POLICY[0], POLICY[1], [[v[0] + 7.0] for v in POLICY[2]]]
    shifted_r = [REFERENCE[0], REFERENCE[1], [[v[0] + 7.0] for v in REFERENCE[2]]]
    assert SELM(beta=0.1, alpha=1.0).loss(make_context(shifted_p, shifted_r)).loss.item() == pytest.approx(
        0.709548, abs=1e-6)  # fmt: skip
    # at an iteration's start (policy = reference) both terms vanish: ln 2 per example
    assert SELM(beta=0.1, alpha=1.0).loss(make_context(POLICY, POLICY)).loss.item() == pytest.approx(math.log(2))


def rollouts(scores: list[list[float]], sources=("policy", "column:chosen", "column:rejected")) -> Rollouts:
    """Hand-made triples: group g's candidates get completion ids [10·g + k]."""
    group = [g for g, values in enumerate(scores) for _ in values]
    n = len(group)
    ids = [[10 * g + k] for g, values in enumerate(scores) for k in range(len(values))]
    return Rollouts(prompt_ids=[[100 + g] for g in group], completion_ids=ids, prompts=[""] * n, completions=[""] * n,
                    group=torch.tensor(group), source=[sources[k] for values in scores for k in range(len(values))],
                    scores=torch.tensor([v for values in scores for v in values], dtype=torch.float64).unsqueeze(-1),
                    weights=torch.ones(1), eos=torch.ones(n, dtype=torch.bool), lengths=torch.ones(n))  # fmt: skip


def test_the_refresh_ranks_own_answer_and_the_dataset_pair():
    rows = SELM().make_examples(rollouts([[0.5, 0.9, 0.1],  # own answer in the middle: the dataset pair
                                          [2.0, 1.0, 0.0],  # own answer best: it becomes chosen
                                          [0.0, 1.0, 0.5],  # own answer worst: it becomes rejected
                                          [1.0, 1.0, 0.0],  # ties: the first (own answer) is chosen
                                          [3.0, 3.0, 3.0]]))  # all tied: first chosen, last rejected
    pairs = [(r["chosen_ids"][0], r["rejected_ids"][0], r["reference_ids"][0]) for r in rows]
    assert pairs == [(1, 2, 0), (10, 12, 10), (21, 20, 20), (30, 32, 30), (40, 42, 40)]
    assert [r["prompt_ids"] for r in rows] == [[100], [101], [102], [103], [104]]
    with pytest.raises(TrlPlusError, match="needs the policy's own answer"):
        SELM().make_examples(rollouts([[1.0, 0.0]], sources=("column:chosen", "column:rejected")))


def test_three_sequences_per_example():
    collate = SELM().collator(pad_token_id=0, max_length=None)
    batch = collate([{"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9], "reference_ids": [3, 4, 2]},
                     {"prompt_ids": [5], "chosen_ids": [7, 7], "rejected_ids": [8], "reference_ids": [3]}])
    assert batch["input_ids"].shape[0] == 6  # sequence-major: chosen x 2, rejected x 2, y_ref x 2
    assert batch["input_ids"][4].tolist()[:5] == [5, 6, 3, 4, 2]
    assert batch["completion_mask"][4].tolist()[:5] == [0, 0, 1, 1, 1]


def selm_recipe(tmp_path: Path, steps: int = 4, prompts: int = 24, **method_args) -> str:
    rows = [{"prompt": f"Count to {i}:", "chosen": "777777", "rejected": "no, not me"} for i in range(prompts)]
    return tiny_recipe(tmp_path, "selm", rows, method_args={"beta": 0.1, "alpha": 0.01, **method_args},
                       rollout={"decoding": {"max_new_tokens": 6}, "scorers": [{"name": "digits"}]},
                       iterations={"count": 3}, training={"max_steps": steps})  # fmt: skip


def test_an_iterated_selm_run_raises_its_greedy_answers_reward(tmp_path):
    import json

    from trl_plus import train

    result = train(selm_recipe(tmp_path))
    run = Path(result.output_dir)
    firsts = iteration_firsts(run)
    assert all(first["loss"] == pytest.approx(math.log(2), abs=1e-6) for first in firsts)  # promoted reference
    rewards = [first["rollout/reward_policy"] for first in firsts]  # the greedy answers' digits
    print("greedy-answer reward per iteration", rewards)
    assert rewards[2] - rewards[0] > 2.0, rewards  # measured 1.0 -> 0.0 -> 6.0 (of 6 digits)
    rows = [json.loads(line) for line in (run / "iter-1" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(set(r) == {"prompt_ids", "chosen_ids", "rejected_ids", "reference_ids"}
                                  for r in rows)  # fmt: skip


def test_the_recipe_validates():
    from trl_plus import check_recipe, load_recipe

    recipe = load_recipe(ROOT / "recipes/selm.yaml")
    assert recipe.method == "selm" and recipe.iterations is not None and recipe.rollout.scorers
    check_recipe(recipe)
