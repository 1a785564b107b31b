"""XPO — Exploratory Preference Optimization (Xie et al., arXiv 2405.21046, ICLR 2025): online DPO whose second
response comes from the reference policy, plus an exploration bonus α·log πθ(reference response).

Every step, for each of the batch's prompts x: y ~ πθ(·|x) (the policy sample) and ỹ ~ πref(·|x) (the reference
sample: the policy with its adapter off, or the frozen initial model), both without grad and cut after EOS. The
recipe's scorers rank them; the policy sample is chosen when r(y) ≥ r(ỹ) (ties: the policy sample). With sequence
log-prob sums ℓ over the completion tokens and (y_c, y_r) the chosen and rejected samples:

    Δ = [ℓθ(y_c) − ℓref(y_c)] − [ℓθ(y_r) − ℓref(y_r)]
    L = mean_i [ −log σ(β Δ_i) + α · ℓθ(ỹ_i) ]          (loss_type="ipo": (Δ_i − 1/(2β))² + α · ℓθ(ỹ_i))

The bonus is the POLICY's token-sum log-prob of the REFERENCE sample, with gradient, whichever side ỹ is on; no
reference log-prob and no β multiply it (TRL's ``XPOTrainer``, the form the card tests). Minimising it lowers the
policy's likelihood of typical reference outputs: mass moves outside the reference's support.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from trl_plus import (
    DPO,
    DPOConfig,
    LossContext,
    LossOutput,
    Needs,
    OnlineMethod,
    Paper,
    Rollout,
    Rollouts,
    TrlPlusError,
    hookimpl,
)


class XPOConfig(DPOConfig):
    """XPO hyperparameters: DPO's (β 0.1 = TRL's, ``loss_type`` sigmoid | ipo, IPO on token sums by default, as
    TRL's ``XPOTrainer``) and the bonus weight α (the paper's α, β were not found). The penalty for samples without
    EOS is the recipe's ``rollout.missing_eos_penalty``."""

    alpha: float | list[float] = Field(
        1e-5, description="α, weight of the exploration bonus α·ℓθ(ỹ) (TRL 1e-5); a list: one value per epoch, the "
                          "last one reused")  # fmt: skip
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid = DPO on the sampled pair; ipo = (Δ − 1/(2β))² (TRL's two)")
    ipo_normalize_by_length: bool = Field(
        False, description="IPO only: divide each log-ratio by its completion length (off: token sums, as TRL)")


class XPO(OnlineMethod, DPO):
    """Online DPO on (policy sample, reference sample) pairs with the bonus α·ℓθ(reference sample)."""

    name = "xpo"
    family = "online-generation"
    taxonomy = {"data.feedback": "pair", "data.granularity": "sentence", "learning.paradigm": "online",
                "constraint.reference": "fixed", "property": (), "scope": "text", "survey": ("online",),
                "source": "survey"}  # fmt: skip
    paper = Paper("Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient "
                  "RLHF", "2405.21046")  # fmt: skip
    summary = "online DPO of a policy sample against a reference sample, plus the bonus α·log πθ(reference sample)"
    needs = Needs(reference="yes", precomputable_reference=False, fields=("ref_is_chosen",),
                  rollout=Rollout(n=1, sources=("policy", "reference"),
                                  decoding={"max_new_tokens": 64, "temperature": 0.9}))  # fmt: skip
    Config = XPOConfig

    def make_examples(self, rollouts: Rollouts) -> list[dict[str, Any]]:
        """Per prompt, its i-th policy sample against its i-th reference sample: the policy sample is chosen when
        its reward (after the stage's EOS penalty) is at least the reference sample's; ``ref_is_chosen`` says which
        side holds the reference sample."""
        if not {"policy", "reference"} <= set(rollouts.source):
            raise TrlPlusError("xpo pairs a policy sample with a reference sample: rollout.sources must hold policy "
                               "and reference")  # fmt: skip
        reward, rows = rollouts.reward(), []
        for g in range(rollouts.num_groups):
            members = rollouts.rows_of(g)
            policy = [i for i in members if rollouts.source[i] == "policy"]
            reference = [i for i in members if rollouts.source[i] == "reference"]
            for p, r in zip(policy, reference):
                ref_chosen = bool(reward[p] < reward[r])  # ties: the policy sample is chosen
                chosen, rejected = (r, p) if ref_chosen else (p, r)
                rows.append({"prompt_ids": rollouts.prompt_ids[p], "chosen_ids": rollouts.completion_ids[chosen],
                             "rejected_ids": rollouts.completion_ids[rejected],
                             "ref_is_chosen": ref_chosen})  # fmt: skip
        return rows

    def alpha(self, epoch: float) -> float:
        """α for the epoch in progress (``epoch``: epochs done, as TRL counts them)."""
        alpha = self.config.alpha
        return alpha[min(int(epoch), len(alpha) - 1)] if isinstance(alpha, list) else alpha

    def loss(self, ctx: LossContext) -> LossOutput:
        """mean(DPO part + α·ℓθ(ỹ)); rewards β·(ℓθ − ℓref); logs the two parts, α and ``objective/kl``."""
        import torch

        dpo, ratios = self.pair_losses(ctx)  # −log σ(βΔ), or (Δ − 1/(2β))² on the sums; [2, B] log-ratios
        logps = ctx.logps()
        bonus = self.alpha(ctx.epoch) * torch.where(ctx.batch["ref_is_chosen"].bool(), logps[0], logps[1])
        metrics = {"loss/dpo": dpo.detach().mean(), "loss/xpo": bonus.detach().mean(), "alpha": self.alpha(ctx.epoch),
                   "objective/kl": ratios.detach().mean()}  # fmt: skip
        return LossOutput(loss=(dpo + bonus).mean(), rewards=self.config.beta * ratios.detach(), metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``xpo``."""
    register(XPO)
