"""``GroupMethod``: the base of group-RL methods (GRPO and its relatives: a group of ``rollout.n`` completions per
prompt, rewards from the recipe's scorers, advantages, a policy-gradient loss), trained by
:class:`~trl_plus.trainers.group.PlusGRPOTrainer` on TRL's ``GRPOTrainer``, and the context their loss sees.

A group method has two optional hooks; with neither it is TRL's GRPO as configured (``training.loss_type``,
``scale_rewards``, ``epsilon``...), and a third for a method that is TRL's GRPO with some of its settings:

- :meth:`GroupMethod.advantages` sees the **whole generation batch** (every process's rows gathered, identical on
  each process) as a :class:`~trl_plus.Rollouts` with the raw per-scorer scores, and returns ``[N]`` per-row or
  ``[N, T]`` per-token advantages (coefficients). Micro-batches never hold whole groups (TRL shuffles the batch
  and splits it), so anything coupled within a group must become a per-row number here.
- :meth:`GroupMethod.loss` gets this micro-batch's :class:`GroupContext` and returns a
  :class:`~trl_plus.LossOutput` in place of TRL's clipped surrogate.
- :meth:`GroupMethod.grpo_config` adjusts TRL's ``GRPOConfig`` once, before TRL's trainer is built (e.g. mo-grpo's
  ``multi_objective_aggregation`` and per-head reward weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from ..contract import LossOutput, Method, MethodConfig, Needs, Paper, Rollout, Rollouts

if TYPE_CHECKING:
    import torch


@dataclass
class GroupContext:
    """One micro-batch of a group-RL step, as :meth:`GroupMethod.loss` sees it (``M`` rows, ``T`` completion tokens;
    log-probs are of the policy at the rollout temperature, as TRL's GRPO computes them).

    - ``token_logps`` ``[M, T]``: the current policy (with grad); ``old_token_logps`` ``[M, T]``: the policy that
      sampled (detached; equal to ``token_logps.detach()`` on the first optimiser step after generation unless
      the method set ``wants_old_logps``); ``ref_token_logps``: the reference's, when ``beta > 0``;
    - ``mask`` ``[M, T]`` (float; 1 on the completion's tokens, EOS included);
    - ``advantages`` ``[M]`` or ``[M, T]``: from :meth:`GroupMethod.advantages` (or TRL's);
    - ``rows_per_update``: rows per optimiser step on this process (micro-batch × gradient accumulation), so
      :meth:`share` of per-row terms sums, over the micro-batches of one update, to their mean;
    - ``step_in_generation``: 0 on the micro-batches of the first optimiser step after a generation, then 1, 2...
      (``steps_per_generation`` / ``num_iterations`` reuse one generation batch for several updates);
    - ``batch``: the micro-batch's other fields (the row-level values :meth:`GroupMethod.advantages` left);
    - ``turn_ids`` ``[M, T]`` (multi-turn episodes only): the turn of each policy token, −1 elsewhere (the
      environment's observation tokens, which ``mask`` already leaves out).
    """

    token_logps: torch.Tensor
    old_token_logps: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    config: MethodConfig
    rows_per_update: int
    step_in_generation: int = 0
    ref_token_logps: torch.Tensor | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    turn_ids: torch.Tensor | None = None

    def sequence_logps(self, mean: bool = True) -> torch.Tensor:
        """``[M]`` the policy's log-probability of each completion: the token mean (``mean=True``) or sum."""
        total = (self.token_logps * self.mask).sum(-1)
        return total / self.mask.sum(-1).clamp(min=1) if mean else total

    def ratio(self, level: Literal["token", "sequence", "turn"] = "token") -> torch.Tensor:
        """π_θ / π_old: ``[M, T]`` per token; ``[M]`` per sequence (exp of the token-mean log-ratio, GSPO's); or
        ``[M, K]`` per turn of a multi-turn episode (exp of the turn's summed log-ratio: the probability ratio of
        the whole turn, OPRL's; 1 where a row has fewer than ``K`` turns)."""
        import torch

        log_ratio = (self.token_logps - self.old_token_logps) * self.mask
        if level == "token":
            return torch.exp(log_ratio)
        if level == "turn":
            if self.turn_ids is None:
                raise ValueError("ratio('turn') needs multi-turn episodes (rollout.environment)")
            return torch.exp(turn_sums(log_ratio, self.turn_ids)[0])
        return torch.exp(log_ratio.sum(-1) / self.mask.sum(-1).clamp(min=1))

    def share(self, per_row: torch.Tensor) -> torch.Tensor:
        """``per_row.sum() / rows_per_update``: this micro-batch's share of the update's mean over rows."""
        return per_row.sum() / self.rows_per_update


def turn_sums(values: torch.Tensor, turn_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-turn sums of per-token ``values`` ``[N, T]`` over the tokens of each turn (``turn_ids`` ``[N, T]``, −1:
    no turn): ``([N, K] sums, [N, K] bool: the row has that turn)``, ``K`` the most turns of any row (at least 1)."""
    import torch

    inside = turn_ids >= 0
    turns = int(turn_ids.max().item()) + 1 if inside.any() else 1
    index = turn_ids.clamp(min=0)
    sums = torch.zeros(values.size(0), turns, dtype=values.dtype, device=values.device)
    sums = sums.scatter_add(1, index, values * inside)
    counts = torch.zeros(values.size(0), turns, dtype=torch.long, device=values.device)
    return sums, counts.scatter_add(1, index, inside.long()) > 0


class GroupMethod(Method):
    """A group-RL method (see the module docstring). Subclass it, set ``name``, ``paper`` and ``Config``, and
    override :meth:`advantages` and/or :meth:`loss`; ``needs.rollout`` gives ``n`` (TRL's ``num_generations``) and
    the decoding (``max_new_tokens`` → ``max_completion_length``, ``temperature``, ``top_p``, ...); the recipe's
    ``rollout:`` block overrides them and names the scorers (each output one TRL reward function, weighted).

    ``wants_old_logps``: compute the sampling policy's log-probs right after generation even when TRL would skip
    them (one more no-grad forward): a method whose :meth:`advantages` reads ``rollouts.old_token_logps`` or whose
    loss needs them on the first step sets it.
    ``beta`` (in ``Config``, when the method has one) becomes TRL's KL coefficient; ``beta > 0`` needs a reference:
    the adapter off with LoRA, else a frozen copy of the starting policy (never reloaded from the hub)."""

    family: ClassVar[str] = "group-rl"
    trainer: ClassVar[str] = "group"
    needs: ClassVar[Needs] = Needs(reference="optional", precomputable_reference=False,
                                   rollout=Rollout(n=8, decoding={"max_new_tokens": 64, "temperature": 1.0}))
    data_fields: ClassVar[tuple[str, ...]] = ("prompt",)
    tokenized_columns: ClassVar[tuple[str, ...]] = ()
    example_data: ClassVar[dict[str, Any]] = {"path": "recipes/data/online_prompts.jsonl"}
    #: The ``rollout:`` block of the example recipe ``trl-plus show`` prints (a rule scorer: runs on the CPU).
    example_rollout: ClassVar[dict[str, Any]] = {"n": 4, "decoding": {"max_new_tokens": 16},
                                                 "scorers": [{"name": "digits"}]}  # fmt: skip
    wants_old_logps: ClassVar[bool] = False

    @classmethod
    def required_columns(cls) -> tuple[str, ...]:
        """The prompt column (other columns reach the scorers that read them)."""
        return cls.data_fields

    def advantages(self, rollouts: Rollouts, baseline: torch.Tensor) -> torch.Tensor | None:
        """``[N]`` or ``[N, T]`` advantages of the whole generation batch (``N`` = prompts × ``n``, group-major:
        rows ``g·n .. g·n + n − 1`` are prompt ``g``'s; ``T`` = the longest completion), or ``None`` to keep
        ``baseline``, TRL's (``[N]``: the weighted reward minus its group mean, scaled as ``scale_rewards`` says).
        ``rollouts.old_token_logps`` is ``[N, T]`` when the method ``wants_old_logps``."""
        return None

    def grpo_config(self, args: Any) -> None:
        """Adjust TRL's ``GRPOConfig`` ``args`` in place, once, before TRL's ``GRPOTrainer.__init__`` reads it: the
        trainer has already written the rollout (``num_generations``, decoding), the scorers' ``reward_weights``
        (one per scorer output, in order) and ``beta`` into it. Default: nothing. A method that owns a field
        should refuse a ``training:`` value that contradicts its config rather than overwrite it silently."""

    def loss(self, ctx: GroupContext) -> LossOutput | None:  # type: ignore[override]
        """This micro-batch's loss, or ``None`` for TRL's ``loss_type`` surrogate on :meth:`advantages`."""
        return None

    def attach(self, trainer: Any) -> None:
        """Called once, when the trainer is built (the policy already wrapped by PEFT, before training): where a
        method sets up what it trains beside the policy, e.g. OPRL's process reward model as
        ``trainer.add_trainable_adapter("prm", ...)``, or keeps ``trainer`` to log figures from :meth:`advantages`
        (``trainer.log_metric``; keep it under another name than ``trainer``, the class attribute naming the
        trainer kind). Default: nothing."""


class GRPOConfig(MethodConfig):
    """GRPO's KL coefficient (TRL's ``GRPOConfig.beta``; its default 0: no reference)."""

    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (k3 estimator per token; TRL: 0.0)")


class GRPO(GroupMethod):
    """TRL's GRPO as configured (``training.loss_type``, ``scale_rewards``, ``epsilon``, ``num_iterations``...),
    on the recipe's scorers: the group baseline every group method starts from."""

    name = "grpo"
    summary = "Group Relative Policy Optimization: rewards minus the group mean, clipped surrogate (TRL's GRPO)"
    paper = Paper("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300")
    Config = GRPOConfig
    taxonomy = {"data.feedback": "point", "data.granularity": "sentence", "learning.paradigm": "online",
                "constraint.reference": "fixed", "property": (), "scope": "text", "source": "inferred"}  # fmt: skip


# -- frozen models' token log-probs for group methods (rto's π_dpo and π_ref; load them with trl_plus.frozen_model) --


def rollout_token_logps(model: Any, rollouts: Rollouts, batch_size: int = 8, grad: bool = False) -> torch.Tensor:
    """``[N, T]`` float64 per-token log-probs (temperature 1) of each rollout's completion ids given its prompt ids
    under ``model`` (``T`` = the longest completion; 0 past a completion's end), each row run unpadded on the left
    (prompt from position 0, right padding). ``grad=True`` keeps the graph (a trainable adapter's loss, e.g.
    OPRL's process reward model); the default runs under ``no_grad``."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    n, width = len(rollouts.completion_ids), max((len(c) for c in rollouts.completion_ids), default=0)
    rows_out = []
    with contextlib.nullcontext() if grad else torch.no_grad():
        for start in range(0, n, batch_size):
            rows = [list(p) + list(c) for p, c in zip(rollouts.prompt_ids[start : start + batch_size],
                                                      rollouts.completion_ids[start : start + batch_size])]  # fmt: skip
            length = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long)
            mask = torch.zeros(len(rows), length, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            for i in range(len(rows)):
                p, c = len(rollouts.prompt_ids[start + i]), len(rollouts.completion_ids[start + i])
                row = logps[i, p - 1 : p - 1 + c].double().cpu()
                rows_out.append(torch.nn.functional.pad(row, (0, width - c)))
    return torch.stack(rows_out) if rows_out else torch.zeros(0, width, dtype=torch.float64)
