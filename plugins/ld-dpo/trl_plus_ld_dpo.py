"""LD-DPO — Length Desensitization in Direct Preference Optimization (arXiv 2409.06411).

For a pair with completion lengths l_w, l_l the public length is l_p = min(l_w, l_l). Each response's
log-likelihood keeps its first l_p tokens and down-weights the rest by α (paper Eq. 11):

    ℓ̂(y) = Σ_{t ≤ l_p} log π(y_t | x, y_<t) + α · Σ_{t > l_p} log π(y_t | x, y_<t)

Only the longer response of a pair has a tail. The same split (same l_p, same α) is applied to the reference
log-probs, as TRL 1.16 does with ``DPOConfig.ld_alpha``, so the loss is log 2 at initialisation. Then DPO:
``L = −log σ(β [(ℓ̂θ(y_w) − ℓ̂ref(y_w)) − (ℓ̂θ(y_l) − ℓ̂ref(y_l))])``. α = 1 is DPO exactly.
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import DPO, DPOConfig, LossContext, Paper, hookimpl


class LDDPOConfig(DPOConfig):
    """LD-DPO hyperparameters: DPO's plus ``alpha``."""

    beta: float = Field(0.1, gt=0, description="β, DPO temperature (paper: 0.1 in all experiments)")
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of tokens beyond the pair's shared length; 1 = DPO, 0 = shared prefix only "
        "(paper best: 0.3 Llama2-13B, 0.5 Llama3-8B, 0.6 Qwen2-7B, instruct setting)",
    )


def desensitized_logps(token_logps, mask, alpha: float):
    """``[K, B]`` ℓ̂: per-token log-probs ``[K, B, T]`` summed with tokens past the pair's shared length
    (counted along ``mask``, so prompt and padding never count) weighted by ``alpha``."""
    position = mask.cumsum(-1)  # 1, 2, ... on completion tokens
    shared = mask.sum(-1).min(dim=0).values  # [B]: l_p = min over the pair's sequences
    tail = (position > shared[None, :, None]) & (mask > 0)
    weights = mask - (1 - alpha) * tail.to(mask.dtype)
    return (token_logps * weights).sum(-1)


class LDDPO(DPO):
    """DPO on length-desensitized log-likelihoods: tail tokens of the longer response count α times."""

    name = "ld-dpo"
    taxonomy = {"data.feedback": "pair", "data.granularity": "token", "learning.paradigm": "offline",
                "constraint.reference": "fixed", "property": "length-bias", "scope": "text", "survey": ("length-bias",),
                "source": "survey"}
    paper = Paper("Length Desensitization in Direct Preference Optimization", "2409.06411")
    summary = "DPO with the tokens past the pair's shared length down-weighted by α"
    Config = LDDPOConfig

    def log_ratios(self, ctx: LossContext):
        """``[K, B]`` ℓ̂θ − ℓ̂ref with the same shared length and α for policy and reference."""
        if ctx.ref_token_logps is None:
            raise RuntimeError("ld-dpo needs reference log-probs")
        alpha = self.config.alpha
        return desensitized_logps(ctx.token_logps, ctx.mask, alpha) - desensitized_logps(
            ctx.ref_token_logps, ctx.mask, alpha
        )


@hookimpl
def register_methods(register):
    """Register ``ld-dpo``."""
    register(LDDPO)
