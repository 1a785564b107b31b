"""EAR — Epoch-wise Alternation Recovery (Ma et al., "Learning Preferences without Interaction for Cooperative AI:
A Hybrid Offline-Online Approach", NeurIPS 2025): behaviour cloning on a few trajectories a human liked, alternated
with online RL recovery against a pool of partners, so a cooperative agent takes up the human's style without losing
its zero-shot teamwork. Not a loss: a schedule of two losses, run by the core's ``phases:`` block — a ``bc`` phase
(the core's ``sft``: L_BC = −mean log π(a | s) over the liked steps) for one epoch, then a recovery phase (this
method: GRPO on the environment's team reward) until the team return is back at R₀; rounds until the preference
score reaches P*.

The environment is a one-step cooperative kitchen shipped with the plugin, as text: the prompt says what the
partner does (``"Partner 2 cooks. You:"``), the agent's completion is two characters — its role (``c`` cook, ``s``
serve) and its ingredient (``t`` tomato, ``o`` onion). A soup needs one cook and one server: team reward 20 when
the roles complement each other, else 0 (the paper's 20 points a soup). The human's hidden preference is tomato
(preference score 1 for ``t``), which the team reward does not see. Partners are a fixed pool of stochastic
policies (P(cook) = 0.9, 0.75, 0.25, 0.1: no gradient reaches them). The liked trajectories are the human's
episodes with cooking partners (``"st"``: serve the tomato soup), so cloning them alone also teaches "always
serve", which fails half the partners — what the recovery phase repairs while the preference stays.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from pydantic import Field

from trl_plus import GroupMethod, MethodConfig, Needs, Paper, Rollout, Scorer, hookimpl

__all__ = ["EAR", "KitchenScorer", "PARTNERS", "kitchen_prompts", "liked_trajectories", "outcome"]

#: The partner pool: P(the partner cooks) of each fixed stochastic partner policy.
PARTNERS: tuple[float, ...] = (0.9, 0.75, 0.25, 0.1)
#: Team reward of a completed soup (the paper's Overcooked score: 20 a soup).
SOUP = 20.0


def outcome(completion: str, partner: str) -> tuple[float, float]:
    """``(team reward, preference score)`` of the agent's ``completion`` against a partner who ``cook`` s or
    ``serve`` s: 20 when the agent's role (first character: ``c`` / ``s``) complements the partner's, and 1 when its
    ingredient (second character) is ``t``, tomato. Anything else scores 0."""
    text = completion.strip().lower()
    role = text[:1]
    team = SOUP if (role, partner) in (("s", "cook"), ("c", "serve")) else 0.0
    return team, float(text[1:2] == "t")


def kitchen_prompts(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """``n`` episodes' prompts: a partner drawn from :data:`PARTNERS`, its action sampled from its policy
    (seeded), ``{"prompt": "Partner k will cook", "partner": "cook"}`` (the action last: what the agent answers)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(len(PARTNERS))
        partner = "cook" if rng.random() < PARTNERS[k] else "serve"
        rows.append({"prompt": f"Partner {k} will {partner}", "partner": partner})
    return rows


def liked_trajectories(n: int = 16, seed: int = 1) -> list[dict[str, str]]:
    """The human's liked episodes as behaviour-cloning rows ``{"prompt", "completion"}``: all with a cooking partner
    (the human served tomato soup: ``"st"``), the small, one-sided set cloning overfits to."""
    rows = [r for r in kitchen_prompts(8 * n, seed) if r["partner"] == "cook"][:n]
    return [{"prompt": r["prompt"], "completion": "st"} for r in rows]


class KitchenScorer(Scorer):
    """The kitchen's two outputs per completion: ``team`` (20 when the roles complement each other) and
    ``preference`` (1 for tomato), read against the data's ``partner`` column (see :func:`outcome`)."""

    name = "kitchen"
    summary = "the cooperative kitchen of hybrid-offline-online: team reward (20 a soup) and the human's preference"
    outputs = ("team", "preference")
    columns = ("partner",)

    def score(self, prompts: list, completions: list, partner: list) -> Any:
        import torch

        return torch.tensor([outcome(str(c), p) for c, p in zip(completions, partner, strict=True)],
                            dtype=torch.float64)  # fmt: skip


class EARConfig(MethodConfig):
    """The recovery phase is TRL's GRPO on the team reward; ``beta`` is its KL coefficient (0: no reference)."""

    beta: float = Field(0.0, ge=0, description="KL coefficient of the recovery phase (TRL's GRPO default 0)")


class EAR(GroupMethod):
    """EAR's online recovery phase (GRPO on the kitchen's team reward; the behaviour-cloning phase is ``sft``), run
    in alternation by a recipe's ``phases:`` block: see ``recipes/hybrid-offline-online.yaml``."""

    name = "hybrid-offline-online"
    taxonomy = {"data.feedback": "point", "data.granularity": "turn", "learning.paradigm": "online",
                "constraint.reference": "fixed", "property": (), "scope": "agent", "source": "inferred"}  # fmt: skip
    family = "policy-rl"
    summary = "EAR: one BC epoch on liked trajectories, then RL recovery until the team return is back (phases:)"
    paper = Paper("Learning Preferences without Interaction for Cooperative AI: A Hybrid Offline-Online Approach",
                  None, venue="NeurIPS 2025", url="https://openreview.net/forum?id=QVheAhJefR")  # fmt: skip
    Config = EARConfig
    needs = Needs(reference="optional", precomputable_reference=False,
                  rollout=Rollout(n=4, decoding={"max_new_tokens": 2, "temperature": 1.0}))  # fmt: skip
    example_data: ClassVar[dict[str, Any]] = {"path": "recipes/data/kitchen_prompts.jsonl"}
    example_rollout: ClassVar[dict[str, Any]] = {"n": 4, "decoding": {"max_new_tokens": 2},
                                                 "scorers": [{"name": "kitchen", "weight": [1.0, 0.0]}]}  # fmt: skip


@hookimpl
def register_methods(register):
    """Register ``hybrid-offline-online``."""
    register(EAR)


@hookimpl
def register_scorers(register):
    """Register the ``kitchen`` scorer."""
    register(KitchenScorer)
