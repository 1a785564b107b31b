"""DisCO — Discriminative Constrained Optimization (Li et al., arXiv 2505.12366), as the official code
Optimization-AI/DisCO (``verl/verl/trainer/ppo/core_algos.py``: ``compute_policy_loss_disco_logL`` and friends)
computes it, on trl-plus's :class:`~trl_plus.PlusGRPOTrainer`.

Per question q, rollouts o with a binary verifier reward split into positives P (r = 1) and negatives N (r = 0); a
question with both is *valid*. With a discriminative score s(o) — the token-mean log-likelihood (``score: logL``,
default) or the token-mean likelihood ratio π_θ/π_old (``score: Lratio``):

    J_q = mean_{i∈P} s_i − τ log mean_{j∈N} exp(s_j / τ)        (variant disco; disco-b: − mean_{j∈N} s_j)
    J   = (1/Q) Σ_{valid q} J_q                                  (Q counts every question, invalid ones too)
    K̂   = token-mean of (log π_old − log π_θ)                    (kl_type kl; low_var_kl: + π_θ/π_old − 1)
    L   = −J + sg(β [K̂ − δ]₊) · K̂                                (its gradient: that of (β/2)[K̂ − δ]₊²)

no clipping, no reference model. ∂J_q/∂s_i = 1/|P| on positives and −softmax_{j∈N}(s_j/τ) on negatives, so the loss
is Σ_o c_o s(o) / Q with per-rollout coefficients c_o. Micro-batches never hold whole groups here, so
:meth:`DisCO.advantages` computes c_o from WHOLE groups of the gathered generation batch, with the sampling policy's
scores (``rollouts.old_token_logps``), and returns n·c_o (so that a mean over rows is the mean over questions);
:meth:`DisCO.loss` is then −mean_rows(n·c_o · s(o)) + the KL penalty of the micro-batch. On the first optimiser
step after a generation (π_θ = π_old) this is exactly the official gradient; on later steps of the same generation
batch the softmax weights stay those of π_old (the official code recomputes them from the current scores).
"""

from __future__ import annotations

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

__all__ = ["DisCO", "DisCOConfig", "coefficients", "disco_objective", "kl_estimate", "kl_penalty",
           "negative_weights", "split"]  # fmt: skip


class DisCOConfig(MethodConfig):
    """DisCO's hyperparameters, the official logL scripts' defaults (``run_disco_logL_*_8k.sh``)."""

    score: Literal["logL", "Lratio"] = Field(
        "logL", description="s(o): token-mean log-likelihood (logL) or likelihood ratio π_θ/π_old (Lratio); both "
                            "released (paper: logL with τ 10, Lratio with τ 1)")  # fmt: skip
    variant: Literal["disco", "disco-b"] = Field(
        "disco", description="disco: τ·log-mean-exp over negatives (DRO); disco-b: the plain mean of the negatives")
    tau: float = Field(10.0, gt=0, description="τ, DRO temperature over the negatives (official logL scripts: 10)")
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
    both (the official code's ``r == 1`` / ``r == 0`` on a {0, 1} verifier)."""
    positive = rewards > threshold
    negative = ~positive
    return positive, negative, positive.any(-1) & negative.any(-1)


def negative_weights(scores: torch.Tensor, negative: torch.Tensor, tau: float, variant: str = "disco") -> torch.Tensor:
    """``[Q, n]`` p_j = ∂(τ log mean_{j∈N} exp(s_j/τ))/∂s_j = softmax_{j∈N}(s_j/τ) (disco-b: 1/|N|); 0 off N."""
    import torch

    if variant == "disco-b":
        return negative.to(scores.dtype) / negative.sum(-1, keepdim=True).clamp(min=1)
    logits = (scores.detach() / tau).masked_fill(~negative, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.where(negative, weights, torch.zeros_like(weights)).nan_to_num(0.0)


def uniform_positive_weights(positive: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[Q, n]`` 1/|P| on the positives (DisCO's mean over positives), 0 elsewhere (float64 by default)."""
    import torch

    return positive.to(dtype or torch.float64) / positive.sum(-1, keepdim=True).clamp(min=1)


def coefficients(scores: torch.Tensor, rewards: torch.Tensor, tau: float = 10.0, variant: str = "disco",
                 threshold: float = 0.5, positive_weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[Q, n]`` c_o = Q·∂J/∂s_o: the positives' weights (1/|P|, or ``positive_weights`` normalised within P: DRPO)
    minus the negatives' p_j; 0 in invalid groups."""
    import torch

    positive, negative, valid = split(rewards, threshold)
    if positive_weights is None:
        positive_weights = uniform_positive_weights(positive, scores.dtype)
    c = positive_weights.to(scores.dtype) * positive - negative_weights(scores, negative, tau, variant)
    return torch.where(valid[:, None], c, torch.zeros_like(c))


def disco_objective(scores: torch.Tensor, rewards: torch.Tensor, tau: float = 10.0, variant: str = "disco",
                    threshold: float = 0.5, positive_weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """J = (1/Q) Σ_{valid q} [Σ_{i∈P} w_i s_i − τ log mean_{j∈N} exp(s_j/τ)] of ``[Q, n]`` scores (differentiable;
    the true log-mean-exp, where the official code's S/sg(S) has value ≈ 1 and the same gradient); ``w`` = 1/|P|
    or ``positive_weights`` (normalised within P)."""
    import torch

    positive, negative, valid = split(rewards, threshold)
    if positive_weights is None:
        positive_weights = uniform_positive_weights(positive, scores.dtype)
    positive_term = (positive_weights.to(scores.dtype) * positive * scores).sum(-1)
    count = negative.sum(-1).clamp(min=1)
    if variant == "disco-b":
        negative_term = (scores * negative).sum(-1) / count
    else:
        logits = (scores / tau).masked_fill(~negative, float("-inf"))
        negative_term = tau * (torch.logsumexp(logits, -1) - count.log())
    per_question = torch.where(valid, positive_term - negative_term, torch.zeros_like(positive_term))
    return per_question.sum() / rewards.size(0)


def kl_estimate(token_logps: torch.Tensor, old_token_logps: torch.Tensor, mask: torch.Tensor,
                kl_type: str = "kl") -> torch.Tensor:  # fmt: skip
    """K̂: the token mean over every completion token of the batch of log π_old − log π_θ (``kl``), plus
    π_θ/π_old − 1 per token (``low_var_kl``), as the official code's ``ppo_kl``."""
    import torch

    x = old_token_logps - token_logps
    per_token = x if kl_type == "kl" else x + torch.exp(-x) - 1
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def kl_penalty(kl: torch.Tensor, delta: float, beta: float) -> torch.Tensor:
    """sg(β·max(K̂ − δ, 0))·K̂: the official constraint term; its gradient is β[K̂ − δ]₊ ∇K̂, that of the
    squared hinge (β/2)[K̂ − δ]₊²; 0 (value and gradient) while K̂ ≤ δ."""
    return (beta * (kl - delta)).clamp(min=0).detach() * kl


# -- the method ---------------------------------------------------------------------------------------------------


class DisCO(GroupMethod):
    """DisCO on the recipe's binary verifier (see the module docstring): per-rollout coefficients from whole groups
    in :meth:`advantages`, the un-clipped discriminative score and the squared-hinge KL to π_old in :meth:`loss`."""

    name = "disco"
    taxonomy = {"data.feedback": "point", "data.granularity": "sentence", "learning.paradigm": "online",
                "constraint.reference": "reference-free", "property": (), "scope": "text", "source": "inferred"}  # fmt: skip
    summary = "positives' score above negatives' (log-mean-exp over negatives), squared-hinge KL to π_old, no clipping"
    paper = Paper("DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained Optimization",
                  "2505.12366", code="Optimization-AI/DisCO")  # fmt: skip
    needs = Needs(reference="no", precomputable_reference=False,
                  rollout=Rollout(n=8, decoding={"max_new_tokens": 8192, "temperature": 0.6}))  # fmt: skip
    example_rollout: ClassVar[dict[str, Any]] = {"n": 4, "decoding": {"max_new_tokens": 16},
                                                 "scorers": [{"name": "regex", "args": {"pattern": "7"}}]}  # fmt: skip
    Config = DisCOConfig
    wants_old_logps = True
    metric_prefix = "disco"

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._generation_metrics: dict[str, float] = {}

    # hooks a subclass (DRPO) overrides
    def positive_weights(self, rollouts: Rollouts, positive: torch.Tensor) -> torch.Tensor:
        """``[Q, n]`` the positives' weights, summing to 1 over each group's positives: 1/|P| (DisCO)."""
        return uniform_positive_weights(positive)

    def grouped(self, rollouts: Rollouts) -> tuple[int, int]:
        """``(Q, n)`` of the group-major generation batch (every group the same size, as TRL samples them)."""
        import torch

        total, q = len(rollouts.completion_ids), rollouts.num_groups
        n = total // max(q, 1)
        if q * n != total or not torch.equal(rollouts.group.cpu(), torch.arange(total) // n):
            raise TrlPlusError(f"method {self.name!r}: the generation batch is not {q} whole groups of "
                               "equal size in group-major order")  # fmt: skip
        return q, n

    def sampling_scores(self, rollouts: Rollouts) -> torch.Tensor:
        """``[N]`` s(o) under the sampling policy: the token mean of ``old_token_logps`` (logL), 1 (Lratio)."""
        import torch

        lengths = rollouts.lengths.to(torch.float64)
        if self.config.score == "Lratio":
            return torch.ones_like(lengths)
        old = rollouts.old_token_logps
        if old is None:
            raise TrlPlusError(f"method {self.name!r}: the trainer gave no old log-probs (wants_old_logps)")
        old = old.to(torch.float64)
        mask = torch.arange(old.size(1))[None, :] < lengths[:, None]
        return (old * mask).sum(-1) / lengths.clamp(min=1)

    def advantages(self, rollouts: Rollouts, baseline: torch.Tensor) -> torch.Tensor:
        """``[N]`` n·c_o from whole groups (c_o as :func:`coefficients`, p_j from the sampling policy's scores), so
        that :meth:`loss`'s mean over rows is DisCO's mean over questions."""
        import torch

        q, n = self.grouped(rollouts)
        cfg = self.config
        rewards = rollouts.reward().to(torch.float64).view(q, n)
        scores = self.sampling_scores(rollouts).view(q, n)
        positive, _, valid = split(rewards, cfg.threshold)
        weights = self.positive_weights(rollouts, positive)
        c = coefficients(scores, rewards, cfg.tau, cfg.variant, cfg.threshold, weights)
        J = disco_objective(scores, rewards, cfg.tau, cfg.variant, cfg.threshold, weights)
        self._generation_metrics = {f"{self.metric_prefix}/valid_groups": valid.double().mean().item(),
                                    f"{self.metric_prefix}/objective": J.item()}  # fmt: skip
        return (n * c).flatten()

    def scores(self, ctx: GroupContext, old: torch.Tensor) -> torch.Tensor:
        """``[M]`` s(o) under the current policy (with grad): token-mean log-prob, or token-mean π_θ/π_old."""
        import torch

        if self.config.score == "logL":
            return ctx.sequence_logps()
        ratio = torch.exp((ctx.token_logps - old) * ctx.mask)
        return (ratio * ctx.mask).sum(-1) / ctx.mask.sum(-1).clamp(min=1)

    def loss(self, ctx: GroupContext) -> LossOutput:
        """−mean_rows(n·c_o·s(o)) (this micro-batch's share) + this micro-batch's share of sg(β[K̂ − δ]₊)·K̂, K̂ over
        its tokens. On the first optimiser step after a generation π_old is π_θ (ratio exactly 1, K̂ = 0)."""
        cfg = self.config
        old = ctx.token_logps.detach() if ctx.step_in_generation == 0 else ctx.old_token_logps
        advantages = ctx.advantages
        if advantages.dim() != 1:
            raise TrlPlusError(f"method {self.name!r}: expected [M] per-row coefficients, got "
                               f"{tuple(advantages.shape)}")  # fmt: skip
        s = self.scores(ctx, old)
        objective = -ctx.share(advantages.to(s.dtype) * s)
        kl = kl_estimate(ctx.token_logps, old, ctx.mask, cfg.kl_type)
        penalty = kl_penalty(kl, cfg.delta, cfg.kl_beta)
        share = ctx.token_logps.size(0) / ctx.rows_per_update  # the micro-batch's part of the update
        p = self.metric_prefix
        metrics = {f"{p}/kl": kl.detach(), f"{p}/penalty": penalty.detach(),
                   f"{p}/kl_active": (kl > cfg.delta).float().detach(), **self._generation_metrics}  # fmt: skip
        return LossOutput(loss=objective + share * penalty, metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``disco``."""
    register(DisCO)
