"""TVKD — Preference Distillation via Value based Reinforcement Learning (NeurIPS 2025; official code
kaist-siit-lab/StarLab_Preference-Distillation-via-Value-based-Reinforcement-Learning, the ``qadapter`` branch of
``DistillTrainer.get_batch_loss_metrics`` in ``scripts/run_distill_dpo.py``, run by ``recipes/.../TVKD.yaml``).

A DPO-style pairwise loss on token rewards that subtract a soft value of the next state computed on a (DPO-trained)
teacher's top-k support. Per response y, position t (state s_t = prompt + y_<t), K_t = the teacher's k most likely
next tokens, with the official code's "rest" slot r (the mass outside K_t) when ``rest_slot`` is on:

    P_θ,t = clamp([πθ(v|s_t)]_{v∈K_t} ⊕ [1 − Σ_{v∈K_t} πθ(v|s_t)],  1e-8, 1 − 1e-8),   Q_t = log P_θ,t
    P_T,t = clamp([π_T(v|s_t)]_{v∈K_t} ⊕ [1 − Σ_{v∈K_t} π_T(v|s_t)], 1e-8, 1 − 1e-8)
    V_t   = α̃ · logsumexp((α1 Q_t + α0 log P_T,t) / α̃)        (softvalue "sum")
          = −Σ P_θ,t · Q_t                                    (softvalue "entropy": the student's, on K_t ⊕ r)
    r_t   = Q_t(y_t) − γ V_{t+1},   V after the last response token := 0
    L     = mean_pairs −log σ(Σ_t r_t(y_w) − Σ_t r_t(y_l))                                       (mode "code")

Q_t(y_t) is the label's own log-prob (``ctx.token_logps``, clamped) when y_t ∈ K_t; a label outside K_t scores the
rest slot (official code) or, with ``rest_slot=False`` (the method card's top-k-only reading), log 1e-8. There is no
β and no reference in the shipped recipe. ``mode="shaped_dpo"`` is the abstract's potential-based reading:

    L = mean −log σ( β[(ℓθ − ℓref)(y_w) − (ℓθ − ℓref)(y_l)] + λ[S(y_w) − S(y_l)] ),   S(y) = Σ_t γΦ(s_{t+1}) − Φ(s_t)

with Φ = the teacher-only "sum" value (α1 = 0) and Φ after the last token = 0: γ = 1 telescopes S to −Φ(s_1), the
same for both responses (they share the prompt), so it is exactly DPO.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from trl_plus import (
    LossContext,
    LossOutput,
    Method,
    MethodConfig,
    Needs,
    Paper,
    TopK,
    TrlPlusError,
    hookimpl,
)

#: The official code's probability floor (``torch.clamp(p, min=1e-8)``, also the ceiling 1 − 1e-8).
FLOOR = 1e-8
#: The frozen source's name: the recipe block ``teachers.teacher``.
TEACHER = "teacher"


class TVKDConfig(MethodConfig):
    """TVKD hyperparameters: the official ``TVKD.yaml`` values (``qadapter_*``), plus the shaped-DPO reading's."""

    mode: Literal["code", "shaped_dpo"] = Field(
        "code", description="code = the official qadapter 'dpo' loss (no β, no reference); shaped_dpo = DPO plus a "
        "potential-based shaping from the teacher's soft value (inferred from the abstract; needs a reference)",
    )  # fmt: skip
    softvalue: Literal["sum", "entropy"] = Field(
        "sum", description="V_t: sum = α̃·logsumexp((α1·Q + α0·log π_T)/α̃) (the code's default, a teacher value when "
        "α1 = 0); entropy = the student's entropy on the teacher's top-k (what TVKD.yaml runs)",
    )  # fmt: skip
    alpha: float = Field(0.7, ge=0, description="α0, weight of the teacher log-prob in the soft value (TVKD.yaml 0.7)")
    alpha_1: float = Field(0.0, ge=0, description="α1, weight of the student Q in the soft value (TVKD.yaml 0.0)")
    alpha_tilde: float = Field(1.0, gt=0, description="α̃, soft-value temperature (TVKD.yaml 1.0)")
    gamma: float = Field(1.0, ge=0, le=1, description="γ, discount of the next state's value (code default 1.0)")
    top_k: int = Field(50, ge=1, description="k, the teacher's stored support per token (official precompute: 50)")
    rest_slot: bool = Field(
        True, description="official code: a (k+1)-th slot holds the mass outside the top-k (student and teacher) in "
        "the soft value, and a label outside the top-k scores it; False: top-k only, such a label scores log 1e-8",
    )  # fmt: skip
    beta: float = Field(0.1, gt=0, description="β of mode shaped_dpo (unused by mode code: TVKD.yaml's 0.01 is gated off)")
    shaping_weight: float = Field(1.0, ge=0, description="λ, weight of the shaping term in mode shaped_dpo")

    @model_validator(mode="after")
    def _shaping_is_a_teacher_potential(self):
        if self.mode == "shaped_dpo" and (self.softvalue != "sum" or self.alpha_1 != 0):
            raise ValueError("mode shaped_dpo shapes with the teacher's soft value: use softvalue 'sum' and alpha_1 0")
        return self


# -- the pieces ---------------------------------------------------------------------------------------------------


def teacher_topk(ctx: LossContext, k: int):
    """``([K, B, T, k] ids, [K, B, T, k] full-softmax log-probs)`` of the teacher (``ctx.frozen["teacher"]``)."""
    out = ctx.frozen.get(TEACHER)
    if out is None or out.topk_ids is None or out.topk_logps is None:
        raise TrlPlusError("tvkd: the batch has no teacher top-k: give the recipe a teachers.teacher block "
                           "(a model or adapter; mode: precomputed stores its top-k once)")  # fmt: skip
    if out.topk_ids.shape != (*ctx.mask.shape, k):
        raise TrlPlusError(f"tvkd: teachers.teacher gives top-{out.topk_ids.shape[-1]} ids shaped "
                           f"{tuple(out.topk_ids.shape)}; top_k is {k} on a {tuple(ctx.mask.shape)} batch")  # fmt: skip
    return out.topk_ids, out.topk_logps


def support_probs(logps, rest_slot: bool):
    """``[..., k] -> [..., k (+1)]`` probabilities on the top-k (and the rest slot ``1 − Σ``), clamped to
    ``[1e-8, 1 − 1e-8]`` like the official ``load_input_and_target_probs_fast``."""
    import torch

    probs = logps.exp()
    if rest_slot:
        probs = torch.cat([probs, 1 - probs.sum(-1, keepdim=True)], -1)
    return probs.clamp(FLOOR, 1 - FLOOR)


def soft_values(q, log_teacher, config: TVKDConfig):
    """``[..., S] -> [...]``: V_t per position from the student's ``q = log P_θ`` and the teacher's ``log P_T`` (either
    may be ``None`` where the value does not read it: the teacher in "entropy", the student in "sum" with α1 = 0)."""
    import torch

    if config.softvalue == "entropy":
        return -(q.exp() * q).sum(-1)
    scores = config.alpha * log_teacher
    if config.alpha_1:
        scores = scores + config.alpha_1 * q
    return config.alpha_tilde * torch.logsumexp(scores / config.alpha_tilde, -1)


def next_values(values, mask):
    """``[K, B, T]``: V(s_{t+1}) at each position t, 0 after the last scored token (the official code reads the next
    tensor slot, padding included) and off the scored tokens."""
    import torch.nn.functional as F

    values = values * mask
    return F.pad(values[..., 1:], (0, 1)) * mask


def label_ids(ctx: LossContext):
    """``[K, B, T]`` the label token ids (``ctx.labels``, which the trainer sets)."""
    if ctx.labels is None:
        raise TrlPlusError("tvkd: the loss needs the label ids (ctx.labels)")
    return ctx.labels


# -- the method ---------------------------------------------------------------------------------------------------


class TVKD(Method):
    """Pairwise loss on token rewards Q(y_t) − γV(s_{t+1}) with V a soft value on the teacher's top-k support."""

    name = "tvkd"
    taxonomy = {"data.granularity": "token", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "text", "source": "inferred"}
    family = "distillation"
    paper = Paper(
        "Preference Distillation via Value based Reinforcement Learning",
        "2509.16965",
        code="kaist-siit-lab/StarLab_Preference-Distillation-via-Value-based-Reinforcement-Learning",
    )
    summary = "DPO-style loss on token rewards minus a soft value of the next state on a teacher's top-k (precomputed)"
    # the class shows the default (mode code, k = 50); an instance sets its own from the config (see __init__)
    needs = Needs(reference="no", teachers={TEACHER: TopK(50)}, scored_logits=True)
    Config = TVKDConfig

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        code = self.config.mode == "code"
        self.needs = Needs(
            reference="no" if code else "yes", teachers={TEACHER: TopK(self.config.top_k)}, scored_logits=code,
        )  # fmt: skip

    def loss(self, ctx: LossContext) -> LossOutput:
        """Mode ``code`` or ``shaped_dpo`` (module docstring); rewards are each sequence's summed token reward."""
        import torch.nn.functional as F

        cfg = self.config
        ids, teacher_logps = teacher_topk(ctx, cfg.top_k)
        mask = ctx.mask
        log_teacher = support_probs(teacher_logps.to(ctx.token_logps.dtype), cfg.rest_slot).log()
        if cfg.mode == "shaped_dpo":
            return self._shaped_dpo(ctx, log_teacher)

        q = support_probs(ctx.logps_at(ids).to(ctx.token_logps.dtype), cfg.rest_slot).log()  # [K, B, T, k(+1)]
        values = soft_values(q, log_teacher, cfg)
        in_topk = (ids == label_ids(ctx).unsqueeze(-1)).any(-1) & mask.bool()
        outside = q[..., -1] if cfg.rest_slot else q.new_full(mask.shape, math.log(FLOOR))
        label_q = ctx.token_logps.clamp(math.log(FLOOR), math.log1p(-FLOOR)).where(in_topk, outside)
        v_next = next_values(values, mask)
        rewards = ((label_q - cfg.gamma * v_next) * mask).sum(-1)  # [K, B]
        losses = -F.logsigmoid(rewards[0] - rewards[1])
        scored = mask.sum().clamp(min=1)
        return LossOutput(
            loss=losses.mean(),
            rewards=rewards.detach(),
            metrics={
                "tvkd/value_next": (v_next.detach() * mask).sum() / scored,
                "tvkd/label_in_topk": in_topk.sum() / scored,
            },
        )

    def _shaped_dpo(self, ctx: LossContext, log_teacher) -> LossOutput:
        import torch.nn.functional as F

        cfg = self.config
        mask = ctx.mask
        phi = soft_values(None, log_teacher, cfg) * mask  # α1 = 0: the teacher's "sum" value
        shaping = cfg.gamma * next_values(phi, mask).sum(-1) - phi.sum(-1)  # [K, B]  S(y)
        ratios = ctx.logps() - ctx.ref_logps()
        rewards = cfg.beta * ratios + cfg.shaping_weight * shaping
        losses = -F.logsigmoid(rewards[0] - rewards[1])
        return LossOutput(
            loss=losses.mean(),
            rewards=rewards.detach(),
            metrics={"tvkd/shaping_margin": (shaping[0] - shaping[1]).detach().mean()},
        )


@hookimpl
def register_methods(register):
    """Register ``tvkd``."""
    register(TVKD)
