"""RTO — DPO Meets PPO: Reinforced Token Optimization for RLHF (Zhong et al., arXiv 2404.18922, ICML 2025; official
code zkshan2002/RTO, an OpenRLHF fork), in its GRPO-based form ("rto-lite": TRL 1.16 has no PPO trainer).

RTO's dense token reward for response token a_t (s_t = prompt + a_<t), computed at rollout time (no grad), as the
release's ``_compute_dpo_rewards`` and ``compute_reward`` do:

    r_t = clip(β1·(log π_dpo(a_t|s_t) − log π_ref(a_t|s_t)), −c, c)  −  β2·(log π_old(a_t|s_t) − log π_ref(a_t|s_t))

(β1 ``dpo_reward_scale``, c ``dpo_reward_clip``, 0 = no clip; β2 ``kl_coef``, the release's ``init_kl_coef``, k1
estimator; π_ref the initial/SFT policy, π_dpo a frozen DPO-trained model; π_old the policy that sampled). rto-lite
keeps the sentence-level reward model as GRPO's: the recipe's scorers give A_i, TRL's group-normalised advantage,
and the token rewards enter as their return-to-go (γ = 1; GAE with γ = λ = 1 and no critic):

    A_it = A_i + Σ_{k ≥ t} r_ik          ([N, T] advantages, TRL's clipped surrogate on them)

A faithful RTO puts the RM score at the last token, learns a critic and uses GAE(γ = 1, λ = 0.95) with PPO's
value loss — an RL loop TRL no longer has (see the README). π_dpo and π_ref are loaded by the method from
``dpo_model`` / ``ref_model`` (:func:`trl_plus.frozen_model`) onto the trainer's device and read with
:func:`trl_plus.rollout_token_logps` (temperature 1) over the gathered generation batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from trl_plus import (
    GroupMethod,
    MethodConfig,
    Needs,
    Paper,
    Rollout,
    Rollouts,
    TrlPlusError,
    frozen_model,
    hookimpl,
    rollout_token_logps,
)

if TYPE_CHECKING:
    import torch


class RTOConfig(MethodConfig):
    """RTO's token-reward hyperparameters, the release's launcher values (``train_rto_llama_8b.sh``)."""

    dpo_model: str | None = Field(None, description="π_dpo (required to train): a frozen DPO-trained model (folder, "
                                  "hub id, alias) or a LoRA adapter folder on π_ref, sharing the policy's tokenizer")  # fmt: skip
    ref_model: str | None = Field(None, description="π_ref: the initial/SFT policy (the release's PPO reference); "
                                                    "None: dpo_model's adapter base with the adapter off")  # fmt: skip
    dpo_reward_scale: float = Field(0.05, ge=0, description="β1, scale of the DPO token reward (launcher 0.05)")
    dpo_reward_clip: float = Field(0.05, ge=0, description="c, |r_dpo| ≤ c per token (launcher 0.05; 0: no clip)")
    kl_coef: float = Field(0.01, ge=0, description="β2, per-token k1 KL reward to π_ref (release init_kl_coef 0.01)")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="λ of GAE(γ = 1, λ) on the token rewards with V ≡ 0 (no "
                              "critic): A_t = Σ_k λ^k r_(t+k) (release lambda 0.95; 1: plain return-to-go)")  # fmt: skip
    token_baseline: Literal["none", "batch-mean"] = Field(
        "batch-mean", description="subtracted from the token returns: batch-mean = their mean over the generation "
        "batch's tokens (the mean part of the release's advantage whitening); none = raw returns")  # fmt: skip
    batch_size: int = Field(8, ge=1, description="rows per forward of π_dpo and π_ref")


def dpo_token_rewards(dpo_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, scale: float,
                      clip: float) -> torch.Tensor:  # fmt: skip
    """``clip(β1·(log π_dpo − log π_ref), ±c)`` per token (``clip`` 0: none), 0 where ``mask`` is 0."""
    r = scale * (dpo_logps - ref_logps)
    if clip > 0:
        r = r.clamp(-clip, clip)
    return r * mask


def kl_token_rewards(old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """``−β2·(log π_old − log π_ref)`` per token (k1), 0 where ``mask`` is 0."""
    return -coef * (old_logps - ref_logps) * mask


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``Σ_{k ≥ t} λ^(k−t) r_k`` per token: GAE(γ = 1, λ) with V ≡ 0 (no critic; λ = 1: the plain return-to-go),
    0 where ``mask`` is 0."""
    import torch

    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + lam * running
        out[:, t] = running
    return out * mask


class RTO(GroupMethod):
    """rto-lite: GRPO's sequence advantage plus the return-to-go of RTO's clipped DPO token rewards and k1 KL
    rewards, as ``[N, T]`` advantages."""

    name = "rto"
    family = "policy-rl"
    summary = "GRPO advantage + return-to-go of clipped per-token DPO rewards β1·log(π_dpo/π_ref) (rto-lite)"
    taxonomy = {"data.feedback": "point", "data.granularity": "token", "learning.paradigm": "online",
                "constraint.reference": "fixed", "property": (), "scope": "text", "survey": ("token",),
                "source": "survey"}  # fmt: skip
    paper = Paper("DPO Meets PPO: Reinforced Token Optimization for RLHF", "2404.18922", code="zkshan2002/RTO")
    needs = Needs(reference="yes", precomputable_reference=False,
                  rollout=Rollout(n=8, decoding={"max_new_tokens": 64, "temperature": 1.0}))  # fmt: skip
    Config = RTOConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dpo: Any = None  # π_dpo and π_ref, loaded by grpo_config (or set here before the trainer is built)
        self.ref: Any = None

    @property
    def wants_old_logps(self) -> bool:  # type: ignore[override]  (the KL reward reads π_old)
        return self.config.kl_coef > 0

    def grpo_config(self, args: Any) -> None:
        """Load π_dpo and π_ref (frozen) onto the trainer's device; TRL's own KL term stays off (``beta`` 0: the
        KL to π_ref is RTO's per-token reward)."""
        if self.dpo is None:
            if self.config.dpo_model is None:
                raise TrlPlusError("method_args.dpo_model: RTO needs π_dpo, a DPO-trained copy of the starting policy "
                                   "(a model or LoRA adapter folder; e.g. runs/quickstart-tiny from trl-plus train "
                                   "recipes/quickstart-tiny.yaml)")  # fmt: skip
            self.dpo = frozen_model(self.config.dpo_model, device=args.device)
        if self.ref is None and self.config.ref_model is not None:
            self.ref = frozen_model(self.config.ref_model, device=args.device)
        if self.ref is None and not hasattr(self.dpo, "disable_adapter"):
            raise TrlPlusError("method_args.ref_model: dpo_model is a full model, so π_ref needs its own folder (the "
                               "initial/SFT policy); or give dpo_model as a LoRA adapter folder on π_ref")  # fmt: skip

    def token_logps(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, T]`` log π_dpo and log π_ref of the rollouts' completion tokens (temperature 1)."""
        size = self.config.batch_size
        dpo = rollout_token_logps(self.dpo, rollouts, size)
        if self.ref is not None:
            return dpo, rollout_token_logps(self.ref, rollouts, size)
        with self.dpo.disable_adapter():
            return dpo, rollout_token_logps(self.dpo, rollouts, size)

    def token_rewards(self, rollouts: Rollouts) -> torch.Tensor:
        """``[N, T]`` RTO's per-token reward r^dpo_t + r^kl_t (0 past each completion's end)."""
        import torch

        dpo, ref = self.token_logps(rollouts)
        mask = (torch.arange(dpo.size(1)) < rollouts.lengths[:, None]).double()
        c = self.config
        r = dpo_token_rewards(dpo, ref, mask, c.dpo_reward_scale, c.dpo_reward_clip)
        if c.kl_coef > 0:
            r = r + kl_token_rewards(rollouts.old_token_logps[:, : dpo.size(1)], ref, mask, c.kl_coef)
        return r

    def advantages(self, rollouts: Rollouts, baseline: torch.Tensor) -> torch.Tensor:
        """``A_it = A_i + Σ_{k≥t} r_ik``: TRL's sequence advantage plus the token rewards' return-to-go."""
        import torch

        r = self.token_rewards(rollouts)
        mask = (torch.arange(r.size(1)) < rollouts.lengths[:, None]).double()
        returns = returns_to_go(r, mask, self.config.gae_lambda)
        if self.config.token_baseline == "batch-mean":
            returns = returns - (returns * mask).sum() / mask.sum().clamp(min=1)
        return (baseline[:, None] + returns) * mask


@hookimpl
def register_methods(register):
    """Register ``rto``."""
    register(RTO)
