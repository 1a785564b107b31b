"""OPRL — Online Process Reward Learning (arXiv 2509.19199; no official code found), on trl-plus's
:class:`~trl_plus.PlusGRPOTrainer` with a multi-turn environment (``rollout.environment``).

An implicit process reward model π_φ (a causal LM initialised from the policy: here a second LoRA adapter on the
policy's base with its own optimiser) scores each of the agent's turns a_t by how much more likely it finds the turn
than the sampling policy π_θold does, and is itself trained online by a trajectory-level DPO against π_θold:

    r_φ(a_t)   = β [ℓ_φ(a_t) − ℓ_θold(a_t)]          ℓ(a_t): the turn's summed token log-probs       (Eq. 1)
    J_PRM(φ)   = −mean_pairs log σ(β[ℓ_φ(τ⁺) − ℓ_θold(τ⁺)] − β[ℓ_φ(τ⁻) − ℓ_θold(τ⁻)]),  ℓ(τ) = Σ_t ℓ(a_t) (Eq. 2)
    A^E(τ_i)   = (r_o(τ_i) − mean) / std over the task's N episodes (outcome reward r_o)           (Eq. 3)
    A^S(a_t^i) = (r_φ(a_t^i) − mean) / std over every turn of every episode of the task           (Eq. 4)
    A(a_t^i)   = A^E(τ_i) + α A^S(a_t^i), on every token of the turn                                (Eq. 5)
    J_policy   = mean_i mean_t min(ρ_t A_t, clip(ρ_t, 1 ± ε) A_t),  ρ_t = exp(ℓθ(a_t) − ℓθold(a_t)) (Eq. 6)

Order per generation batch (the paper's Algorithm 1): roll out, score the outcomes, one PRM forward on every
episode (giving r_φ and J_PRM), all (τ⁺, τ⁻) pairs of each task (r_o(τ⁺) > r_o(τ⁻) + ``pair_margin``, at most
``max_pairs_per_task``), one PRM step, advantages from the r_φ before that step (``step_reward_after_prm_update``:
from the updated PRM, Section 3.1's order, one more PRM forward), then the policy's steps. Stds are sample stds
(torch's default); a group whose std is 0 gets advantages 0 (the card's guard). No KL term, no reference model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

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
    rollout_token_logps,
    turn_sums,
)

if TYPE_CHECKING:
    import torch

__all__ = ["OPRL", "OPRLConfig", "combined_advantages", "episode_advantages", "normalised", "prm_loss",
           "prm_pairs", "step_advantages", "step_rewards", "turn_objective"]  # fmt: skip

#: A std below this is 0: the group's advantages are 0 (the card's guard for φ = θold, where every r_φ is 0).
STD_FLOOR = 1e-6


class OPRLConfig(MethodConfig):
    """OPRL's hyperparameters (the paper's defaults; its learning rates are for 7B full fine-tuning)."""

    beta: float = Field(0.05, gt=0, le=1, description="β: step-reward and PRM-DPO temperature (paper: 0.05)")
    alpha: float = Field(1.0, ge=0, description="α: weight of the step advantages (paper: 1; 0 = the base GRPO)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="ε: the clip of the turn-level ratio (paper: 0.2)")
    prm_lr: float = Field(1e-6, gt=0, description="the PRM's learning rate, constant AdamW (paper: 1e-6)")
    pair_margin: float = Field(0.0, ge=0, description="(τ⁺, τ⁻) pairs need r_o(τ⁺) > r_o(τ⁻) + margin (0: "
                                                       "success vs failure on a binary outcome, the paper's)")  # fmt: skip
    max_pairs_per_task: int | None = Field(64, ge=1, description="cap on a task's pairs, first in sampling order "
                                                                 "(paper: unspecified; null: all)")  # fmt: skip
    step_reward_after_prm_update: bool = Field(
        False, description="r_φ from the PRM after this batch's PRM step (Section 3.1) instead of before it "
                           "(Algorithm 1, the default: one PRM forward serves both)")  # fmt: skip


# -- the objective, as pure functions (the card's worked example tests them) -------------------------------------


def step_rewards(prm_turn_logps: torch.Tensor, old_turn_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """``[N, K]`` r_φ(a_t) = β[ℓ_φ(a_t) − ℓ_θold(a_t)] of per-turn summed log-probs (Eq. 1)."""
    return beta * (prm_turn_logps - old_turn_logps)


def normalised(values: torch.Tensor) -> torch.Tensor:
    """``(values − mean) / std`` (sample std) of a 1-D tensor; 0 when the std is below :data:`STD_FLOOR`."""
    import torch

    if values.numel() < 2:
        return torch.zeros_like(values)
    std = values.std()
    return torch.zeros_like(values) if std < STD_FLOOR else (values - values.mean()) / std


def episode_advantages(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[N]`` A^E: each episode's outcome reward normalised within its task's group (Eq. 3)."""
    import torch

    out = torch.zeros_like(rewards)
    for g in group.unique():
        rows = group == g
        out[rows] = normalised(rewards[rows])
    return out


def step_advantages(rewards: torch.Tensor, present: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` A^S: each turn's step reward normalised over every turn of every episode of its task, pooled
    (Eq. 4); 0 where a row has no such turn."""
    import torch

    out = torch.zeros_like(rewards)
    for g in group.unique():
        cells = (group == g)[:, None] & present
        out[cells] = normalised(rewards[cells])
    return out


def combined_advantages(episode: torch.Tensor, step: torch.Tensor, present: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[N, K]`` A = A^E + α A^S on each present turn, 0 elsewhere (Eq. 5)."""
    return (episode[:, None] + alpha * step) * present


def prm_pairs(rewards: torch.Tensor, group: torch.Tensor, margin: float = 0.0,
              cap: int | None = None) -> list[tuple[int, int]]:  # fmt: skip
    """``(i⁺, j⁻)`` row pairs within each task with r_i > r_j + ``margin``, in sampling order, at most ``cap`` per
    task."""
    pairs = []
    for g in group.unique().tolist():
        rows = (group == g).nonzero().flatten().tolist()
        mine = [(i, j) for i in rows for j in rows if rewards[i] > rewards[j] + margin]
        pairs += mine[:cap] if cap is not None else mine
    return pairs


def prm_loss(prm_logps: torch.Tensor, old_logps: torch.Tensor, pairs: list[tuple[int, int]],
             beta: float) -> torch.Tensor:  # fmt: skip
    """J_PRM (Eq. 2): mean over ``pairs`` of −log σ(β[ℓ_φ(τ⁺) − ℓ_old(τ⁺)] − β[ℓ_φ(τ⁻) − ℓ_old(τ⁻)]) of
    ``[N]`` trajectory log-probs."""
    import torch

    chosen = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    rejected = torch.tensor([j for _, j in pairs], dtype=torch.long)
    margin = beta * (prm_logps - old_logps)
    return -torch.nn.functional.logsigmoid(margin[chosen] - margin[rejected]).mean()


def turn_objective(ratio: torch.Tensor, advantages: torch.Tensor, present: torch.Tensor,
                   epsilon: float) -> torch.Tensor:  # fmt: skip
    """``[M]`` each episode's mean over its turns of min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t) (Eq. 6's inner sum
    over t, divided by the episode's turn count)."""
    import torch

    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)
    return (surrogate * present).sum(-1) / present.sum(-1).clamp(min=1)


def action_turns(turn_ids: torch.Tensor | None, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[N, T]`` the rollouts' turn ids; single-turn rollouts (no environment): one turn over the completion."""
    import torch

    if turn_ids is not None:
        return turn_ids[:, :width]
    inside = torch.arange(width)[None, :] < lengths[:, None]
    return torch.where(inside, 0, -1)


# -- the method ---------------------------------------------------------------------------------------------------


class OPRL(GroupMethod):
    """OPRL (see the module docstring): the PRM adapter's step and the fused per-turn advantages in
    :meth:`advantages`, the turn-level clipped surrogate in :meth:`loss`."""

    name = "oprl"
    summary = "implicit process reward model trained online by trajectory DPO; turn advantages added to GRPO's"
    paper = Paper("Online Process Reward Learning for Agentic Reinforcement Learning", "2509.19199")
    taxonomy = {"data.feedback": "point", "data.granularity": "turn", "learning.paradigm": "online",
                "constraint.reference": "reference-free", "property": (), "scope": "agent", "source": "inferred"}  # fmt: skip
    needs = Needs(reference="no", precomputable_reference=False,
                  rollout=Rollout(n=8, decoding={"max_new_tokens": 512, "temperature": 1.0}))  # fmt: skip
    example_model: ClassVar[dict[str, Any]] = {"name_or_path": "tiny-llama", "lora": {
        "r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]}}  # fmt: skip
    example_rollout: ClassVar[dict[str, Any]] = {"n": 4, "decoding": {"max_new_tokens": 8},
                                                 "scorers": [{"name": "digits"}],
                                                 "environment": {"name": "turns", "args": {"max_turns": 2}}}  # fmt: skip
    Config = OPRLConfig

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.prm: Any = None  # the trainer's TrainableAdapter "prm", made by attach()
        self.group_trainer: Any = None  # the PlusGRPOTrainer (not `trainer`: that is the trainer kind)

    def attach(self, trainer: Any) -> None:
        """The PRM: a copy of the policy's adapter (π_φ initialised from the policy) with its own AdamW."""
        self.group_trainer = trainer
        self.prm = trainer.add_trainable_adapter("prm", lr=self.config.prm_lr)

    def _turn_logps(self, rollouts: Rollouts, turns: torch.Tensor,
                    grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """``([N, K] per-turn sums, [N, K] the row has the turn, [N] trajectory sums)`` of the model's log-probs as it
        is now (the active adapter), without dropout."""
        model = self.prm.model
        was_training = model.training
        model.eval()
        try:
            tokens = rollout_token_logps(model, rollouts, grad=grad)
        finally:
            model.train(was_training)
        per_turn, present = turn_sums(tokens, turns)
        return per_turn, present, (tokens * (turns >= 0)).sum(-1)

    def advantages(self, rollouts: Rollouts, baseline: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` A on each action token (0 on observations): π_θold's and the PRM's turn log-probs, the PRM's
        DPO step on this batch's pairs, A^E + α A^S."""
        import torch

        if self.prm is None:
            raise TrlPlusError(f"method {self.name!r}: no PRM adapter (attach() was not called by the trainer)")
        cfg = self.config
        width = max((len(c) for c in rollouts.completion_ids), default=0)
        turns = action_turns(rollouts.turn_ids, rollouts.lengths, width)
        rewards = rollouts.reward().to(torch.float64)
        pairs = prm_pairs(rewards, rollouts.group, cfg.pair_margin, cfg.max_pairs_per_task)
        logged = {"prm/pairs": float(len(pairs))}
        old_turn, present, old_traj = self._turn_logps(rollouts, turns, grad=False)  # the policy that sampled
        with self.prm.training():
            prm_turn, _, prm_traj = self._turn_logps(rollouts, turns, grad=True)
            if pairs:
                loss = prm_loss(prm_traj, old_traj, pairs, cfg.beta)
                logged |= {"prm/loss": loss.item(), "prm/grad_norm": self.prm.step(loss)}
            if cfg.step_reward_after_prm_update:
                prm_turn, _, _ = self._turn_logps(rollouts, turns, grad=False)
        r_step = step_rewards(prm_turn.detach(), old_turn, cfg.beta)
        a_episode = episode_advantages(rewards, rollouts.group)
        a_step = step_advantages(r_step, present, rollouts.group)
        per_turn = combined_advantages(a_episode, a_step, present, cfg.alpha)
        logged |= {"oprl/step_reward": r_step[present].mean().item(),
                   "oprl/step_reward_std": r_step[present].std().item() if present.sum() > 1 else 0.0}  # fmt: skip
        for name, value in logged.items():
            self.group_trainer.log_metric(name, value)
        return per_turn.gather(1, turns.clamp(min=0)) * (turns >= 0)

    def loss(self, ctx: GroupContext) -> LossOutput:
        """−(this micro-batch's share of) mean_i mean_t min(ρ_t A_t, clip(ρ_t) A_t), ρ_t the turn's probability
        ratio, A_t the turn's advantage (the same on each of its tokens)."""
        import torch

        turns = ctx.turn_ids
        if turns is None:  # single-turn rollouts: the completion is one turn
            turns = torch.where(ctx.mask > 0, 0, -1)
            ctx.turn_ids = turns
        advantages = ctx.advantages
        if advantages.dim() != 2:
            raise TrlPlusError(f"method {self.name!r}: expected [M, T] per-token advantages, got "
                               f"{tuple(advantages.shape)}")  # fmt: skip
        counts, present = turn_sums(ctx.mask, turns)
        per_turn_advantage = turn_sums(advantages.to(ctx.token_logps.dtype) * ctx.mask, turns)[0] / counts.clamp(min=1)
        ratio = ctx.ratio("turn")
        objective = turn_objective(ratio, per_turn_advantage, present, self.config.epsilon)
        clipped = ((ratio - 1).abs() > self.config.epsilon) & present
        metrics = {"oprl/clip_fraction": (clipped.sum() / present.sum().clamp(min=1)).detach(),
                   "oprl/turns": present.sum(-1).float().mean().detach()}  # fmt: skip
        return LossOutput(loss=-ctx.share(objective), metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``oprl``."""
    register(OPRL)
