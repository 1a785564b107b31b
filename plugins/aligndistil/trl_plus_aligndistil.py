"""AlignDistil — Token-Level Language Model Alignment as Adaptive Policy Distillation (ACL 2025; official code
songmzhang/AlignDistil, the off-policy trainer ``OpenRLHF/openrlhf/trainer/aligndistil_offpolicy_trainer.py``,
``--reward_boost_type aligndistil``).

The policy is distilled, token by token, towards a teacher built from two frozen models trained from the policy's
initial model: a DPO model π_dpo (logits z_d) and a reverse-DPO model π_rev (DPO with chosen/rejected swapped, z_r).
At each response position t (the distribution that predicts response token t):

    TVD_t = Σ_v |p_d(v) − p_r(v)|,        w_t = r · TVD_t + 1e-3          (L1 distance, no ½; r = the CLI's beta2)
    z*_t  = z_d + w_t (z_d − z_r),        q_t = softmax(z*_t / T)          (contrastive logit extrapolation)
    ℓ_t   = (β / w_t) · KL(p_θ,t ‖ q_t)                                     (reverse KL over the full vocabulary)
    L     = kd_coef · mean_sequences  Σ_t ℓ_t / |y|                         (``--reward_len_norm``)

w_t and q_t carry no gradient; the rejected response is unused (``use_rejected`` trains on it too). The other
``--reward_boost_type`` branches of the same trainer are available: ``theorem1`` z* = w z_d + (1 − w) z_r and
``theorem1_contrast`` z* = z_d + w (z_d − z_r) with the constant w = β / r and coefficient r; ``theorem1_adaptive``
the linear combination with the adaptive w_t and coefficient β / w_t.

Positions: the official off-policy trainer masks the logits at the positions *of* the response tokens (labels are not
shifted), so it never uses the distribution that predicts the first response token and uses the one after the last.
This plugin uses the distribution that predicts each response token (``ctx.scored_logits()``): a deliberate
deviation, pinned by a test.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trl_plus import (
    LossContext,
    LossOutput,
    Method,
    MethodConfig,
    Needs,
    Paper,
    TrlPlusError,
    hookimpl,
)

#: The frozen sources: recipe blocks ``teachers.dpo`` and ``teachers.rev``.
DPO_TEACHER, REVERSE_TEACHER = "dpo", "rev"
BOOST_TYPES = ("aligndistil", "theorem1", "theorem1_contrast", "theorem1_adaptive")
#: Scored rows per chunk of the no-grad teacher side (a few ``[CHUNK, V]`` float32 tensors alive at once).
CHUNK = 256


class AlignDistilConfig(MethodConfig):
    """AlignDistil hyperparameters (official off-policy recipe ``aligndistil_off_policy.sh``)."""

    beta: float = Field(0.1, gt=0, description="β, scale of the DPO reward in the token objective (recipe 0.1)")
    beta2: float = Field(
        10.0, ge=0, description="r, multiplier of the total-variation distance in w_t = r·TVD + 1e-3 (off-policy "
        "recipe 10, on-policy 15, CLI default 1); the constant variants use w = β / r and coefficient r",
    )  # fmt: skip
    weight_floor: float = Field(1e-3, gt=0, description="the floor added to w_t (hard-coded 1e-3 in the code)")
    kd_temperature: float = Field(1.0, gt=0, description="T, the teacher logits z*/T (the code leaves the policy's)")
    reward_len_norm: bool = Field(True, description="divide each sequence's loss by its response length (recipe: on)")
    kd_coef: float = Field(1.0, gt=0, description="scale of the loss (recipe 1.0)")
    reward_boost_type: Literal[BOOST_TYPES] = Field(
        "aligndistil", description="aligndistil = adaptive contrastive teacher (the method); theorem1, "
        "theorem1_contrast, theorem1_adaptive = the other branches of the official trainer",
    )  # fmt: skip
    use_rejected: bool = Field(
        False, description="also distil on the rejected response (the official off-policy trainer uses chosen only)"
    )

    @model_validator(mode="after")
    def _constant_weight_needs_r(self):
        if self.reward_boost_type in ("theorem1", "theorem1_contrast") and self.beta2 == 0:
            raise ValueError(f"reward_boost_type {self.reward_boost_type} uses w = beta / beta2: beta2 must be > 0")
        return self


# -- the pieces ---------------------------------------------------------------------------------------------------


def teacher_logits(ctx: LossContext):
    """``([M, V] z_d, [M, V] z_r)``: the two teachers' logits at the scored positions (``ctx.frozen``)."""
    scored = int(ctx.mask.sum().item())
    found = []
    for name in (DPO_TEACHER, REVERSE_TEACHER):
        out = ctx.frozen.get(name)
        if out is None or out.logits is None:
            raise TrlPlusError(f"aligndistil: the batch has no logits of teachers.{name}: give the recipe the blocks "
                               "teachers.dpo (the DPO model) and teachers.rev (the reverse-DPO model)")  # fmt: skip
        if out.logits.dim() != 2 or out.logits.size(0) != scored:
            raise TrlPlusError(f"aligndistil: teachers.{name} gives logits shaped {tuple(out.logits.shape)}; "
                               f"expected [{scored}, V] (one row per scored token)")  # fmt: skip
        found.append(out.logits)
    return found[0], found[1]


def token_losses(policy, dpo, rev, config: AlignDistilConfig):
    """Per scored token ``(ℓ_t, w_t, TVD_t, KL(p_θ ‖ p_d))`` from ``[M, V]`` policy / DPO / reverse-DPO logits.
    Vocabularies of different widths (Qwen's padded heads) are cut to the smallest, as the code cuts the policy's and
    the DPO model's. The teacher side runs without grad in chunks of :data:`CHUNK` rows."""
    import torch

    width = min(policy.size(-1), dpo.size(-1), rev.size(-1))
    policy = policy[..., :width]
    if policy.size(0) == 0:
        empty = policy.new_zeros(0)
        return empty + policy.sum(-1), empty, empty, empty
    rows = [_teacher_side(policy[i : i + CHUNK].detach(), dpo[i : i + CHUNK, :width], rev[i : i + CHUNK, :width], config)
            for i in range(0, policy.size(0), CHUNK)]  # fmt: skip
    kl, kl_dpo, weight, tvd, coef, grad = (torch.cat(parts) for parts in zip(*rows))
    # the value KL, the gradient p ⊙ (log p − log q − KL) exactly: autograd through log_softmax adds p·(1 − Σp),
    # float noise that β / w_t (up to 100) amplifies; this is 0 where p = q, and the graph keeps one [M, V] tensor
    surrogate = (policy * grad).sum(-1)
    return coef * (kl + surrogate - surrogate.detach()), weight, tvd, kl_dpo


def _teacher_side(policy, dpo, rev, config: AlignDistilConfig):
    """No grad, on a chunk of rows: KL(p_θ ‖ q), KL(p_θ ‖ p_d), w, TVD, the coefficient and ∂KL/∂z_θ."""
    import torch

    with torch.no_grad():
        dpo, rev = dpo.to(policy.dtype), rev.to(policy.dtype)
        log_p = torch.log_softmax(policy, -1)
        p = log_p.exp()
        log_pd, log_pr = torch.log_softmax(dpo, -1), torch.log_softmax(rev, -1)
        tvd = (log_pd.exp() - log_pr.exp()).abs().sum(-1)
        if config.reward_boost_type in ("aligndistil", "theorem1_adaptive"):
            weight = config.beta2 * tvd + config.weight_floor
            coef = config.beta / weight
        else:
            weight = torch.full_like(tvd, config.beta / config.beta2)
            coef = torch.full_like(tvd, config.beta2)
        w = weight.unsqueeze(-1)
        if config.reward_boost_type in ("aligndistil", "theorem1_contrast"):
            target = dpo + w * (dpo - rev)
        else:
            target = w * dpo + (1 - w) * rev
        log_q = torch.log_softmax(target / config.kd_temperature, -1)
        kl = (p * (log_p - log_q)).sum(-1)
        kl_dpo = (p * (log_p - log_pd)).sum(-1)
        grad = p * (log_p - log_q - kl.unsqueeze(-1))  # ∂ KL(p_θ ‖ q) / ∂ z_θ
    return kl, kl_dpo, weight, tvd, coef, grad


def tokenize_chosen(example, tokenizer):
    """``prompt_ids`` and ``chosen_ids`` (TRL's DPO tokenization, EOS appended)."""
    from trl_plus import tokenize_completions

    return tokenize_completions(tokenizer, example["prompt"], {"chosen_ids": example["chosen"]})


def tokenize_chosen_rejected(example, tokenizer):
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (``use_rejected``)."""
    from trl_plus import tokenize_completions

    if example.get("rejected") is None:
        raise TrlPlusError("aligndistil: use_rejected needs a 'rejected' column in the data")
    return tokenize_completions(tokenizer, example["prompt"], {"chosen_ids": example["chosen"],
                                                               "rejected_ids": example["rejected"]})  # fmt: skip


# -- the method ---------------------------------------------------------------------------------------------------


class AlignDistil(Method):
    """Reverse-KL distillation towards z_d + w_t (z_d − z_r), w_t from the two teachers' total-variation distance."""

    name = "aligndistil"
    taxonomy = {"data.granularity": "token", "learning.paradigm": ("offline", "online"),
                "constraint.reference": "fixed", "property": (), "scope": "text", "source": "inferred"}
    family = "distillation"
    paper = Paper(
        "AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation",
        "2503.02832",
        code="songmzhang/AlignDistil",
    )
    summary = "token-level reverse-KL distillation to a DPO / reverse-DPO contrastive teacher with TVD-adaptive weights"
    needs = Needs(reference="no", teachers={DPO_TEACHER: "logits", REVERSE_TEACHER: "logits"}, scored_logits=True)
    Config = AlignDistilConfig
    data_fields = ("prompt", "chosen")
    sequences_per_example = 1
    tokenize = staticmethod(tokenize_chosen)
    tokenized_columns = ("prompt_ids", "chosen_ids")

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.use_rejected:
            self.sequences_per_example = 2
            self.tokenize = tokenize_chosen_rejected
            self.tokenized_columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def collator(self, pad_token_id, max_length, truncation_mode="keep_start"):
        """prompt + chosen (and prompt + rejected with ``use_rejected``), the response scored."""
        from trl_plus import SequencesCollator, prompt_completion

        sides = ("chosen", "rejected")[: self.sequences_per_example]

        def sequences(example):
            return [prompt_completion(example["prompt_ids"], example[f"{side}_ids"]) for side in sides]

        return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode, side_names=sides)

    def loss(self, ctx: LossContext) -> LossOutput:
        """The batch mean of the per-sequence (length-normalised) sums of ℓ_t; logs w, TVD and KL(p_θ ‖ p_d)."""
        cfg = self.config
        dpo, rev = teacher_logits(ctx)
        losses, weight, tvd, kl_dpo = token_losses(ctx.scored_logits(), dpo, rev, cfg)
        lengths = ctx.lengths.clamp(min=1)
        exists = ctx.sequence_mask

        def per_sequence(values, normalise=True):
            sums = ctx.unscored(values.to(ctx.mask.dtype)).sum(-1)
            return sums / lengths if normalise else sums

        def mean(values):  # per-sequence token mean, then over the sequences that exist
            return (per_sequence(values.detach()) * exists).sum() / exists.sum().clamp(min=1)

        sequence_losses = per_sequence(losses, cfg.reward_len_norm)
        loss = cfg.kd_coef * (sequence_losses * exists).sum() / exists.sum().clamp(min=1)
        return LossOutput(
            loss=loss,
            metrics={"aligndistil/weight": mean(weight), "aligndistil/tvd": mean(tvd),
                     "aligndistil/kl_dpo": mean(kl_dpo)},  # fmt: skip
        )


@hookimpl
def register_methods(register):
    """Register ``aligndistil``."""
    register(AlignDistil)
