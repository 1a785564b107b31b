"""DRPO — Decoupled Reward Policy Optimization (arXiv 2510.04474), as the official code Optimization-AI/DRPO
(``compute_policy_loss_drpo`` in ``verl/verl/trainer/ppo/core_algos.py``) computes it, on trl-plus's
:class:`~trl_plus.PlusGRPOTrainer`.

DisCO (arXiv 2505.12366, plugin ``disco``) with the logL score s(o) = (1/|o|) Σ_t log π_θ(o_t | q, o_<t) and its
positives re-weighted by a length reward normalised WITHIN the positives of each question (negatives never enter
it, so a correct but long answer keeps a positive coefficient):

    ρ_i = 1 − L_i / L_max,   w̃_i = softmax_{i∈P}(ρ_i / λ)  (= softmax_{i∈P}(−L_i / (λ L_max)))
    J_q = Σ_{i∈P} w̃_i s_i − τ log mean_{j∈N} exp(s_j / τ),   J = (1/Q) Σ_{valid q} J_q
    L   = −J + sg(β [K̂ − δ]₊) · K̂,   K̂ = token-mean of (log π_old − log π_θ)

λ → ∞ (or equal lengths): w̃ = 1/|P|, DisCO exactly. As in ``disco``, micro-batches never hold whole groups, so
:meth:`DRPO.advantages` computes per-rollout coefficients c_i = w̃_i (positives), c_j = −softmax_{j∈N}(s_j/τ)
(negatives, from the sampling policy's scores), 0 in invalid groups, from WHOLE groups of the gathered generation
batch, and returns n·c_o; :meth:`DRPO.loss` is −mean_rows(n·c_o·s(o)) plus the micro-batch's KL penalty.
This file repeats the few DisCO functions it needs (a plugin imports only ``trl_plus``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from trl_plus import (
    GroupContext,
    GroupMethod,
    LossOutput,
    MethodConfig,
    Needs,
    Paper,
    Rollout,
    Rollouts,
    TrlPlusError,
    hookimpl,
)

if TYPE_CHECKING:
    import torch

__all__ = ["DRPO", "DRPOConfig", "coefficients", "drpo_objective", "kl_estimate", "kl_penalty", "length_weights"]


class DRPOConfig(MethodConfig):
    """DRPO's hyperparameters, the official scripts' (``run_drpo_{1.5b,7b}_8k.sh``)."""

    length_lambda: float = Field(
        0.1, gt=0, description="λ, the positives' length-preference temperature (official: 0.1, the released "
                               "'Lambda-0.1'; smaller: shorter answers preferred; inf: DisCO)")  # fmt: skip
    max_length: int = Field(
        8192, ge=1, description="L_max of ρ = 1 − L/L_max: set it to rollout.decoding.max_new_tokens (official: the "
                                "padded response width, max_response_length 8192)")  # fmt: skip
    tau: float = Field(10.0, gt=0, description="τ, DRO temperature over the negatives (official: 10)")
    delta: float = Field(1e-4, ge=0, description="δ, the KL budget to π_old (official: 1e-4)")
    kl_beta: float = Field(
        1e3, ge=0, description="β, the squared-hinge penalty weight (official: 1e3; not `beta`, which is the "
                               "reference-KL coefficient of every group method)")  # fmt: skip
    kl_type: Literal["kl", "low_var_kl"] = Field(
        "kl", description="K̂: token-mean of log π_old − log π_θ (kl, the scripts'); low_var_kl adds π_θ/π_old − 1")
    threshold: float = Field(
        0.5, description="a rollout is a positive when its weighted reward > threshold, else a negative (0.5: a {0, 1} "
                         "verifier's r = 1 / r = 0, as the official code)")  # fmt: skip


# -- the objective, as pure functions of [Q, n] tensors (the card's worked example tests them) -------------------


def split(rewards: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positive, negative, valid)`` of ``[Q, n]`` rewards: r > threshold, r ≤ threshold, and ``[Q]`` groups with
    both."""
    positive = rewards > threshold
    negative = ~positive
    return positive, negative, positive.any(-1) & negative.any(-1)


def length_weights(lengths: torch.Tensor, positive: torch.Tensor, length_lambda: float, max_length: float,
                   reward: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[Q, n]`` w̃ = softmax over each group's positives of ρ/λ, ρ = 1 − L/L_max (or the given ``reward``); 0 off
    P. λ = inf: 1/|P| exactly."""
    import torch

    rho = 1 - lengths.to(torch.float64) / max_length if reward is None else reward.to(torch.float64)
    logits = torch.zeros_like(rho) if math.isinf(length_lambda) else rho / length_lambda
    weights = torch.softmax(logits.masked_fill(~positive, float("-inf")), dim=-1)
    return torch.where(positive, weights, torch.zeros_like(weights)).nan_to_num(0.0)


def coefficients(scores: torch.Tensor, rewards: torch.Tensor, positive_weights: torch.Tensor, tau: float = 10.0,
                 threshold: float = 0.5) -> torch.Tensor:  # fmt: skip
    """``[Q, n]`` c_o = Q·∂J/∂s_o: w̃_i on positives, −softmax_{j∈N}(s_j/τ) on negatives, 0 in invalid groups."""
    import torch

    positive, negative, valid = split(rewards, threshold)
    logits = (scores.detach() / tau).masked_fill(~negative, float("-inf"))
    p = torch.where(negative, torch.softmax(logits, dim=-1), torch.zeros_like(scores)).nan_to_num(0.0)
    c = positive_weights.to(scores.dtype) * positive - p
    return torch.where(valid[:, None], c, torch.zeros_like(c))


def drpo_objective(scores: torch.Tensor, rewards: torch.Tensor, positive_weights: torch.Tensor, tau: float = 10.0,
                   threshold: float = 0.5) -> torch.Tensor:  # fmt: skip
    """J = (1/Q) Σ_{valid q} [Σ_{i∈P} w̃_i s_i − τ log mean_{j∈N} exp(s_j/τ)] (differentiable in ``scores``; the true
    log-mean-exp, where the official S/sg(S) has value ≈ 1 and the same gradient)."""
    import torch

    positive, negative, valid = split(rewards, threshold)
    positive_term = (positive_weights.to(scores.dtype) * positive * scores).sum(-1)
    logits = (scores / tau).masked_fill(~negative, float("-inf"))
    negative_term = tau * (torch.logsumexp(logits, -1) - negative.sum(-1).clamp(min=1).log())
    per_question = torch.where(valid, positive_term - negative_term, torch.zeros_like(positive_term))
    return per_question.sum() / rewards.size(0)


def kl_estimate(token_logps: torch.Tensor, old_token_logps: torch.Tensor, mask: torch.Tensor,
                kl_type: str = "kl") -> torch.Tensor:  # fmt: skip
    """K̂: the token mean over the batch's completion tokens of log π_old − log π_θ (``kl``), plus π_θ/π_old − 1
    per token (``low_var_kl``), as the official ``ppo_kl``."""
    import torch

    x = old_token_logps - token_logps
    per_token = x if kl_type == "kl" else x + torch.exp(-x) - 1
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def kl_penalty(kl: torch.Tensor, delta: float, beta: float) -> torch.Tensor:
    """sg(β·max(K̂ − δ, 0))·K̂ (gradient β[K̂ − δ]₊∇K̂: the squared hinge's); 0 while K̂ ≤ δ."""
    return (beta * (kl - delta)).clamp(min=0).detach() * kl


# -- the method ---------------------------------------------------------------------------------------------------


class DRPO(GroupMethod):
    """DRPO on the recipe's binary verifier (see the module docstring)."""

    name = "drpo"
    taxonomy = {"data.feedback": "point", "data.granularity": "sentence", "learning.paradigm": "online",
                "constraint.reference": "reference-free", "property": (), "scope": "text", "source": "inferred"}  # fmt: skip
    summary = "DisCO with correct rollouts re-weighted by a length reward normalised within the correct ones only"
    paper = Paper("DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization", "2510.04474",
                  code="Optimization-AI/DRPO")  # fmt: skip
    needs = Needs(reference="no", precomputable_reference=False,
                  rollout=Rollout(n=8, decoding={"max_new_tokens": 8192, "temperature": 0.6}))  # fmt: skip
    example_rollout: ClassVar[dict[str, Any]] = {"n": 4, "decoding": {"max_new_tokens": 16},
                                                 "scorers": [{"name": "regex", "args": {"pattern": "7"}}]}  # fmt: skip
    Config = DRPOConfig
    wants_old_logps = True

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._generation_metrics: dict[str, float] = {}

    def positive_reward(self, rollouts: Rollouts) -> torch.Tensor:
        """``[N]`` ρ(o), the preference reward of a positive: 1 − L/L_max (override for another preference)."""
        import torch

        return 1 - rollouts.lengths.to(torch.float64) / self.config.max_length

    def grouped(self, rollouts: Rollouts) -> tuple[int, int]:
        """``(Q, n)`` of the group-major generation batch (every group the same size, as TRL samples them)."""
        import torch

        total, q = len(rollouts.completion_ids), rollouts.num_groups
        n = total // max(q, 1)
        if q * n != total or not torch.equal(rollouts.group.cpu(), torch.arange(total) // n):
            raise TrlPlusError(f"method {self.name!r}: the generation batch is not {q} whole groups of equal size in "
                               "group-major order")  # fmt: skip
        return q, n

    def advantages(self, rollouts: Rollouts, baseline: torch.Tensor) -> torch.Tensor:
        """``[N]`` n·c_o from whole groups (w̃ from the lengths, p_j from the sampling policy's token-mean
        log-probs), so that :meth:`loss`'s mean over rows is DRPO's mean over questions."""
        import torch

        q, n = self.grouped(rollouts)
        cfg = self.config
        if rollouts.old_token_logps is None:
            raise TrlPlusError(f"method {self.name!r}: the trainer gave no old log-probs (wants_old_logps)")
        lengths = rollouts.lengths.to(torch.float64)
        old = rollouts.old_token_logps.to(torch.float64)
        mask = torch.arange(old.size(1))[None, :] < lengths[:, None]
        scores = ((old * mask).sum(-1) / lengths.clamp(min=1)).view(q, n)
        rewards = rollouts.reward().to(torch.float64).view(q, n)
        positive, _, valid = split(rewards, cfg.threshold)
        weights = length_weights(lengths.view(q, n), positive, cfg.length_lambda, cfg.max_length,
                                 reward=self.positive_reward(rollouts).view(q, n))  # fmt: skip
        c = coefficients(scores, rewards, weights, cfg.tau, cfg.threshold)
        J = drpo_objective(scores, rewards, weights, cfg.tau, cfg.threshold)
        positive_lengths = lengths.view(q, n)[positive & valid[:, None]]
        self._generation_metrics = {
            "drpo/valid_groups": valid.double().mean().item(), "drpo/objective": J.item(),
            # the weighted mean length of the positives against their plain mean: what the weights prefer
            "drpo/positive_length": positive_lengths.mean().item() if len(positive_lengths) else 0.0,
            "drpo/weighted_positive_length": ((weights * lengths.view(q, n)).sum(-1)[valid].mean().item()
                                              if valid.any() else 0.0),
        }  # fmt: skip
        return (n * c).flatten()

    def loss(self, ctx: GroupContext) -> LossOutput:
        """−mean_rows(n·c_o·s(o)) (this micro-batch's share) + its share of sg(β[K̂ − δ]₊)·K̂, K̂ over its tokens.
        On the first optimiser step after a generation π_old is π_θ (K̂ = 0)."""
        cfg = self.config
        old = ctx.token_logps.detach() if ctx.step_in_generation == 0 else ctx.old_token_logps
        if ctx.advantages.dim() != 1:
            raise TrlPlusError(f"method {self.name!r}: expected [M] per-row coefficients, got "
                               f"{tuple(ctx.advantages.shape)}")  # fmt: skip
        s = ctx.sequence_logps()
        objective = -ctx.share(ctx.advantages.to(s.dtype) * s)
        kl = kl_estimate(ctx.token_logps, old, ctx.mask, cfg.kl_type)
        penalty = kl_penalty(kl, cfg.delta, cfg.kl_beta)
        share = ctx.token_logps.size(0) / ctx.rows_per_update
        metrics = {"drpo/kl": kl.detach(), "drpo/penalty": penalty.detach(),
                   "drpo/kl_active": (kl > cfg.delta).float().detach(), **self._generation_metrics}  # fmt: skip
        return LossOutput(loss=objective + share * penalty, metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``drpo``."""
    register(DRPO)
