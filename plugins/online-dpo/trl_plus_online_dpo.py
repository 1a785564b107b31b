"""Online DPO — Direct Language Model Alignment from Online AI Feedback (OAIF, Guo et al., arXiv 2402.04792), as
TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOTrainer`` implements it.

Every step, for each of the batch's prompts x: two completions y¹, y² are sampled from the current policy (no grad,
cut after EOS), scored by the recipe's scorers, r(y) = Σ_k w_k R_k(x, y) (NaN outputs skipped), minus
``rollout.missing_eos_penalty`` when y has no EOS; the higher-scored one is chosen (ties: the first sample). Then, with
sequence log-prob sums ℓ over the completion tokens (EOS included) and the frozen initial policy as reference:

    Δ = [ℓθ(y_c) − ℓθ(y_r)] − [ℓref(y_c) − ℓref(y_r)]
    L = −log σ(β Δ)                 (loss_type="sigmoid", default)
    L = (Δ − 1/(2β))²               (loss_type="ipo": token SUMS, not length-normalised, as TRL's OnlineDPOTrainer)

mean over the prompts. Sampling, scoring, the EOS penalty and pairing are the core's rollout stage and
``make_examples``, the loss is DPO's; this module is the config (token-sum IPO by default) and TRL's
``objective/kl``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trl_plus import DPO, DPOConfig, LossContext, Needs, OnlineMethod, Paper, Rollout, hookimpl


class OnlineDPOConfig(DPOConfig):
    """Online DPO hyperparameters: DPO's (β 0.1, ``loss_type`` sigmoid | ipo, ``label_smoothing``), with IPO
    on token sums by default, as TRL 1.16's ``OnlineDPOTrainer`` (the OAIF paper's values were not read). The
    penalty for samples without EOS is the recipe's ``rollout.missing_eos_penalty``."""

    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid = DPO on the sampled pair; ipo = (Δ − 1/(2β))² (TRL's two)")
    ipo_normalize_by_length: bool = Field(
        False, description="IPO only: divide each log-ratio by its completion length (off: token sums, as TRL)")


class OnlineDPO(OnlineMethod, DPO):
    """DPO's loss on a pair the policy has just sampled and the recipe's scorers have ranked."""

    name = "online-dpo"
    family = "online-generation"
    taxonomy = {"data.feedback": "pair", "data.granularity": "sentence", "learning.paradigm": "online",
                "constraint.reference": "fixed", "property": (), "scope": "text", "survey": ("online",),
                "source": "survey"}  # fmt: skip
    paper = Paper("Direct Language Model Alignment from Online AI Feedback", "2402.04792")
    summary = "two samples of the current policy per prompt, ranked by a scorer, DPO (or token-sum IPO) on the pair"
    needs = Needs(reference="yes", precomputable_reference=False,
                  rollout=Rollout(n=2, decoding={"max_new_tokens": 64, "temperature": 0.9}))  # fmt: skip
    Config = OnlineDPOConfig

    def loss(self, ctx: LossContext):
        """DPO's mean loss and rewards, plus TRL's ``objective/kl``: the mean over samples of
        Σ_t (log πθ − log πref)."""
        out = super().loss(ctx)
        out.metrics["objective/kl"] = out.rewards.mean() / self.config.beta
        return out


@hookimpl
def register_methods(register):
    """Register ``online-dpo``."""
    register(OnlineDPO)
