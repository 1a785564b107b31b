"""Online DPO — Direct Language Model Alignment from Online AI Feedback (OAIF, Guo et al., arXiv 2402.04792), as
TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOTrainer`` implements it.

Every step, for each of the batch's prompts x: two completions y¹, y² are sampled from the current policy (no grad,
cut after EOS), scored by the recipe's scorers, r(y) = Σ_k w_k R_k(x, y) (NaN outputs skipped), minus
``missing_eos_penalty`` when y has no EOS; the higher-scored one is chosen (ties: the first sample). Then, with
sequence log-prob sums ℓ over the completion tokens (EOS included) and the frozen initial policy as reference:

    Δ = [ℓθ(y_c) − ℓθ(y_r)] − [ℓref(y_c) − ℓref(y_r)]
    L = −log σ(β Δ)                 (loss_type="sigmoid", default)
    L = (Δ − 1/(2β))²               (loss_type="ipo": token SUMS, not length-normalised, as TRL's OnlineDPOTrainer)

mean over the prompts. Sampling, scoring and pairing are the core's rollout stage and ``make_examples``; this
module is the config and the loss.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trl_plus import (
    DPO,
    LossContext,
    LossOutput,
    MethodConfig,
    Needs,
    OnlineMethod,
    Paper,
    Rollout,
    dpo_losses,
    hookimpl,
)


class OnlineDPOConfig(MethodConfig):
    """Online DPO hyperparameters; defaults are TRL 1.16's ``OnlineDPOConfig`` (the OAIF paper's were not read)."""

    beta: float = Field(0.1, gt=0, description="β, inverse strength of the KL anchor to the initial policy (TRL 0.1)")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid = DPO on the sampled pair; ipo = (Δ − 1/(2β))² on token sums (TRL)")
    missing_eos_penalty: float | None = Field(
        None, description="subtracted from the score of a sample without EOS before pairing (TRL; None: off)")


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

    def make_examples(self, rollouts):
        """The default pairing (best vs worst per prompt, ties to the first sample) after the EOS penalty."""
        return super().make_examples(rollouts.penalize_missing_eos(self.config.missing_eos_penalty))

    def pair_losses(self, ctx: LossContext):
        """``([B] losses, [2, B] log-ratios)``: sigmoid or token-sum IPO of Δ = ρ_c − ρ_r (Δ itself: IPO's sums)."""
        ratios = self.log_ratios(ctx)
        return dpo_losses(ratios[0] - ratios[1], self.config), ratios

    def loss(self, ctx: LossContext):
        """DPO's mean loss and rewards, plus TRL's ``objective/kl``: the mean over samples of
        Σ_t (log πθ − log πref)."""
        losses, ratios = self.pair_losses(ctx)
        return LossOutput(loss=losses.mean(), rewards=self.config.beta * ratios.detach(),
                          metrics={"objective/kl": ratios.detach().mean()})  # fmt: skip


@hookimpl
def register_methods(register):
    """Register ``online-dpo``."""
    register(OnlineDPO)
