"""hybrid-offline-online (EAR): the card's behaviour-cloning example through the core's sft loss, the kitchen's
rewards, the fixed partner pool and shipped data, and the recipe's schedule — one BC epoch per round, then recovery
until its rule or its cap, rounds until the preference rule or the cap — with the figures the README reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from trl_plus_hybrid_offline_online import PARTNERS, KitchenScorer, kitchen_prompts, liked_trajectories, outcome

from trl_plus import SFT, get_method, get_registry
from trl_plus.testing import make_context

ROOT = Path(__file__).resolve().parents[3]


def test_the_cards_bc_step_is_the_mean_nll_of_the_liked_actions():
    # π(·|s1) = [0.5, 0.3, 0.2], π(·|s2) = [0.1, 0.6, 0.3]; liked steps (s1, a0), (s2, a1), (s1, a2)
    ctx = make_context([[[math.log(0.5)], [math.log(0.6)], [math.log(0.2)]]])
    assert SFT().loss(ctx).loss.item() == pytest.approx(0.937804, abs=1e-6)
    uniform = make_context([[[math.log(1 / 3)]] * 3])
    assert SFT().loss(uniform).loss.item() == pytest.approx(math.log(3), abs=1e-12)  # log |A| for a uniform policy


def test_the_kitchen_rewards_complementary_roles_and_the_humans_tomato():
    assert outcome("st", "cook") == (20.0, 1.0) and outcome("co", "serve") == (20.0, 0.0)
    assert outcome("ct", "cook") == (0.0, 1.0) and outcome(" St", "cook") == (20.0, 1.0) and outcome("x", "cook") == (0.0, 0.0)
    scorer = get_registry().get_scorer("kitchen")()
    values = scorer.checked_scores(["p"] * 3, ["st", "ct", "so"], partner=["cook", "serve", "cook"])
    assert values.tolist() == [[20.0, 1.0], [20.0, 1.0], [20.0, 0.0]] and scorer.outputs == ("team", "preference")
    assert isinstance(scorer, KitchenScorer) and get_method("hybrid-offline-online").trainer == "group"


def test_the_partner_pool_is_fixed_and_the_shipped_data_are_the_generators():
    rows = kitchen_prompts(4000, seed=3)
    for k, p in enumerate(PARTNERS):  # each partner acts by its own fixed policy
        acts = [r["partner"] for r in rows if r["prompt"].startswith(f"Partner {k} ")]
        assert abs(sum(a == "cook" for a in acts) / len(acts) - p) < 0.05
    assert kitchen_prompts(8, 0) == kitchen_prompts(8, 0) and all(r["prompt"].endswith(r["partner"]) for r in rows)
    liked = liked_trajectories(16, 1)
    assert len(liked) == 16 and {r["completion"] for r in liked} == {"st"}
    assert all(r["prompt"].endswith("cook") for r in liked)  # the human's episodes: cooking partners only
    data = ROOT / "recipes" / "data"
    assert [json.loads(x) for x in (data / "kitchen_prompts.jsonl").read_text().splitlines()] == kitchen_prompts(64, 0)
    assert [json.loads(x) for x in (data / "kitchen_liked.jsonl").read_text().splitlines()] == liked


def test_the_recipes_schedule_alternates_one_bc_epoch_and_recovery(tmp_path, one_thread):
    from trl_plus import train

    result = train(ROOT / "recipes/hybrid-offline-online.yaml", [f"training.output_dir={tmp_path}", "phases.rounds=2",
                                                                 "training.disable_tqdm=true"])  # fmt: skip
    log = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    for r in (1, 2):
        bc = [e for e in log if e["round"] == r and e["phase"] == "bc" and "loss" in e]
        rec = [e for e in log if e["round"] == r and e["phase"] == "recovery" and "rewards/kitchen/team/mean" in e]
        assert len(bc) == 16 and bc[-1]["epoch"] == pytest.approx(1.0)  # exactly one epoch of the 16 liked episodes
        team = [e["rewards/kitchen/team/mean"] for e in rec]
        window = [sum(team[max(0, i - 4) : i + 1]) / 5 for i in range(4, len(team))]
        assert 1 <= len(rec) <= 30 and not any(w >= 16.0 for w in window[:-1])  # stopped at the first, or capped
        assert rec[0]["rewards/kitchen/preference/mean"] > 0.2  # BC raised the preference (measured 0.34; random ~0.01)
        assert bc[-1]["loss"] < 0.5 * bc[0]["loss"]  # the liked actions cloned (measured 4.67 -> 0.02 in round 1)
    assert result.global_step == sum(1 for e in log if "loss" in e and "train_runtime" not in e)
