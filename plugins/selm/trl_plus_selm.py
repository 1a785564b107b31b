"""SELM — Self-Exploring Language Models: Active Preference Elicitation for Online Alignment (Zhang et al., arXiv
2405.19332; official code ``shenao-zhang/SELM``).

Iterative online DPO whose reference is the previous iterate, plus an optimism term that lowers the likelihood of
that iterate's own greedy answer y_ref. Per iteration (official ``scripts/online_feedback.py``), for every prompt of
the iteration's slice: the current policy answers greedily (``reference_response``); a ranker orders the three
candidates {y_ref, dataset chosen, dataset rejected}; the best becomes chosen, the worst rejected. Then one pass of
(official ``SELMTrainer.optimistic_dpo_loss``, ``loss_type="sigmoid"`` only):

    Δ = [ℓθ(y_w) − ℓθ(y_l)] − [ℓref(y_w) − ℓref(y_l)]
    L = mean_i [ −log σ(β Δ_i) + α β (ℓθ(y_ref,i) − ℓref(y_ref,i)) ]

with ℓ token-sum log-probs over the response and ℓref under no grad. The rollout (``Needs.rollout``) is one greedy
policy answer plus the ``chosen`` and ``rejected`` columns, ranked by the recipe's scorers (PairRM in the paper; any
scorer here); the recipe's ``iterations:`` block gives the slices and promotes the reference.
"""

from __future__ import annotations

from typing import Any

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
    Rollouts,
    TrlPlusError,
    hookimpl,
)


class SELMConfig(MethodConfig):
    """SELM hyperparameters; defaults are the official ``recipes/zephyr-selm/selm_config_full.yaml``."""

    beta: float = Field(0.01, gt=0, description="β, the DPO anchor (0.01 in every official config)")
    alpha: float = Field(0.001, ge=0, description="α, the optimism weight; the term is α·β·(ℓθ − ℓref)(y_ref) "
                         "(official: 0.001 Zephyr/Phi-3, 0.0001 Llama-3; 0 = iterative DPO)")  # fmt: skip


#: The three candidates of the official refresh, in its order: the policy's greedy answer, dataset chosen, rejected.
SOURCES = ("policy", "column:chosen", "column:rejected")


class SELM(OnlineMethod, DPO):
    """Iterative DPO on ranker-relabelled triples, minus α·β times the policy's own greedy answer's log-ratio."""

    name = "selm"
    taxonomy = {"data.feedback": "pair", "data.granularity": "sentence", "learning.paradigm": "online",
                "constraint.reference": "dynamic-reference", "property": "distribution-shift", "scope": "text",
                "survey": ("online", "distribution-shift"), "source": "survey"}  # fmt: skip
    paper = Paper("Self-Exploring Language Models: Active Preference Elicitation for Online Alignment", "2405.19332",
                  code="shenao-zhang/SELM")  # fmt: skip
    summary = "iterative online DPO (reference = previous iterate) with an optimism term on the own greedy answer"
    needs = Needs(
        reference="yes",
        rollout=Rollout(n=1, sources=SOURCES, when="iteration", decoding={"do_sample": False, "max_new_tokens": 1024}),
        precomputable_reference=False,
    )
    data_fields = ("prompt", "chosen", "rejected")
    sequences_per_example = 3
    example_data = {"path": "recipes/data/quickstart_prefs.jsonl"}
    Config = SELMConfig

    def make_examples(self, rollouts: Rollouts) -> list[dict[str, Any]]:
        """Per prompt: the best-scored candidate is chosen, the worst rejected (the first on ties, as the official
        ``np.argmin``/``np.argmax`` of PairRM's ranks), and the policy's own (first) answer is ``reference_ids``;
        when every candidate ties, the first is chosen and the last rejected."""
        reward = rollouts.reward()
        rows = []
        for g in range(rollouts.num_groups):
            members = rollouts.rows_of(g)
            own = [i for i in members if rollouts.source[i] == "policy"]
            if not own or len(members) < 2:
                raise TrlPlusError("selm: each prompt needs the policy's own answer and at least one other candidate "
                                   f"(rollout.sources: {', '.join(SOURCES)}); got {sorted(set(rollouts.source))}")
            values = reward[members]
            best, worst = members[int(values.argmax())], members[int(values.argmin())]
            if best == worst:  # all tied
                best, worst = members[0], members[-1]
            rows.append({"prompt_ids": rollouts.prompt_ids[best], "chosen_ids": rollouts.completion_ids[best],
                         "rejected_ids": rollouts.completion_ids[worst],
                         "reference_ids": rollouts.completion_ids[own[0]]})  # fmt: skip
        return rows

    def collator(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
        """Three sequences per example: prompt + chosen, prompt + rejected, prompt + the greedy answer y_ref."""
        from trl_plus import SequencesCollator, prompt_completion

        def sequences(example):
            return [prompt_completion(example["prompt_ids"], example[f"{side}_ids"])
                    for side in ("chosen", "rejected", "reference")]  # fmt: skip

        return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode,
                                 side_names=("chosen", "rejected", "reference_response"))  # fmt: skip

    def loss(self, ctx: LossContext) -> LossOutput:
        """Mean over examples of the DPO loss plus α·β·(ℓθ − ℓref)(y_ref); rewards β·log-ratios of chosen and
        rejected."""
        import torch.nn.functional as F

        beta, alpha = self.config.beta, self.config.alpha
        ratios = ctx.logps() - ctx.ref_logps()  # [3, B]: chosen, rejected, y_ref
        dpo = -F.logsigmoid(beta * (ratios[0] - ratios[1]))
        optimism = alpha * beta * ratios[2]
        metrics = {"selm/optimism": optimism.detach().mean(), "selm/logps_response": ctx.logps()[2].detach().mean()}
        return LossOutput(loss=(dpo + optimism).mean(), rewards=beta * ratios[:2].detach(), metrics=metrics)


@hookimpl
def register_methods(register):
    """Register ``selm``."""
    register(SELM)
