"""MO-GRPO — Optimizing Safe and Aligned Language Generation: A Multi-Objective GRPO Approach (HydroX AI, arXiv
2503.21819): GRPO driven by one reward model with K regression heads (politeness, meaningfulness, actionability,
safety) whose scores are combined into one reward.

The K heads are the recipe's scorer outputs — one vector scorer (e.g. ``reward-model`` with ``label: [0, 1, 2, 3]``:
one forward per generation batch for all K TRL reward functions) or several scorers — with f_ik head k's score of
completion i. With weights w_k (``weights``; default 1/K) and a group of G completions of one prompt:

    sum_then_normalize (default, the paper's "combined into a single reward signal"):
        R_i = Σ_k w_k f_ik,   A_i = (R_i − mean_G R) / (std_G R + 1e-4)        (Bessel std, per group)
    normalize_then_sum (GDPO, an option):
        z_ik = (f_ik − mean_G f_k) / (std_G f_k + 1e-4),  R_i = Σ_k w_k z_ik,
        A_i = (R_i − mean_batch R) / (std_batch R + 1e-4)

broadcast to every completion token of TRL's clipped surrogate (optional + β·KL to the reference). Both are TRL
1.16's ``GRPOTrainer`` as it is (``multi_objective_aggregation``, ``reward_weights``): this method only sets those
two ``GRPOConfig`` fields (:meth:`MOGRPO.grpo_config`); there is no advantages or loss hook. Training the K-head
reward model (regression on score vectors) is a separate step, not this plugin.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from trl_plus import GroupMethod, MethodConfig, Paper, TrlPlusError, hookimpl

#: TRL's default ``GRPOConfig.multi_objective_aggregation``.
TRL_DEFAULT_AGGREGATION = "sum_then_normalize"


class MOGRPOConfig(MethodConfig):
    """MO-GRPO's hyperparameters (the paper's weights, β and group size were not readable: the card's
    recommendations stand)."""

    weights: list[float] | None = Field(
        None, min_length=1,
        description="w_k, one per reward function (the recipe's scorer outputs, in order), multiplying each "
                    "scorer's weight; None: 1/K each (card's recommendation; the paper's weights were not found)")  # fmt: skip
    aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize",
        description="sum_then_normalize: weighted sum of the heads, then group-normalised (the paper: combined "
                    "into one reward); normalize_then_sum: each head group-normalised first (GDPO, TRL's option)")  # fmt: skip
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (paper's value not found; TRL: 0.0)")


class MOGRPO(GroupMethod):
    """GRPO on a weighted sum of K reward heads (TRL's GRPO, with ``reward_weights`` and
    ``multi_objective_aggregation`` set from the config)."""

    name = "mo-grpo"
    family = "multi-objective"
    summary = "GRPO on K reward heads (one multi-head reward model) combined by weights into one reward"
    taxonomy = {"data.feedback": "point", "data.granularity": "sentence", "learning.paradigm": "online",
                "learning.objective": "multi-objective", "constraint.reference": "fixed",
                "constraint.safety": "safety", "property": (), "scope": "text", "source": "inferred"}  # fmt: skip
    paper = Paper("Optimizing Safe and Aligned Language Generation: A Multi-Objective GRPO Approach", "2503.21819")
    Config = MOGRPOConfig
    example_rollout = {"n": 4, "decoding": {"max_new_tokens": 16},
                       "scorers": [{"name": "digits"}, {"name": "regex", "args": {"pattern": "[aeiou]", "count": True}}]}  # fmt: skip

    def grpo_config(self, args: Any) -> None:
        """``reward_weights`` ← w_k × each scorer's weight (1/K each by default); ``multi_objective_aggregation`` ←
        ``aggregation`` (a ``training.multi_objective_aggregation`` that says otherwise is refused)."""
        current = args.reward_weights
        k = len(current)
        weights = self.config.weights if self.config.weights is not None else [1.0 / k] * k
        if len(weights) != k:
            raise TrlPlusError(f"method_args.weights: {len(weights)} weight(s) for {k} reward function(s) (the "
                               "rollout.scorers' outputs, in order)")  # fmt: skip
        given = args.multi_objective_aggregation
        if given not in (TRL_DEFAULT_AGGREGATION, self.config.aggregation):
            raise TrlPlusError(f"training.multi_objective_aggregation: {given!r} contradicts method_args.aggregation "
                               f"{self.config.aggregation!r}; set method_args.aggregation only")  # fmt: skip
        args.reward_weights = [float(w) * float(s) for w, s in zip(weights, current, strict=True)]
        args.multi_objective_aggregation = self.config.aggregation


@hookimpl
def register_methods(register):
    """Register ``mo-grpo``."""
    register(MOGRPO)
