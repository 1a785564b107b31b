"""DOVE / JPO — joint preference optimisation over (instruction, response) pairs (arXiv 2404.00530).

Each side of a pair has its own instruction: (I_w, R_w) is preferred to (I_l, R_l), and the instructions may
differ ("good oranges vs bad apples"). DOVE scores a side by its *joint* log-likelihood, instruction included:

    J(I, R) = Σ_{t ≥ 2} log π(s_t | s_<t) = log π(I) + log π(R | I),   s = (I, R) tokenised, s_1 not predicted

and then applies DPO's loss to the joint log-ratios (official ``custom_dove_trainer.py``: labels = input ids with
``joint_distribution=True``, token sums, TRL's DPO loss):

    Δ = [Jθ(I_w, R_w) − Jref(I_w, R_w)] − [Jθ(I_l, R_l) − Jref(I_l, R_l)],    L = −log σ(β Δ),  mean over pairs.

With ``joint_distribution=False`` only response tokens are scored: DPO with one prompt per side. When
I_w = I_l the instruction tokens have the same prefix on both sides, so a causal LM gives them the same log-probs
on both sides, under the policy and under the reference separately: the instruction terms cancel inside Δ and
DOVE equals DPO on the responses, whatever policy and reference think of the instruction.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from trl_plus import DPO, DPOConfig, Paper, hookimpl

SIDES = ("chosen", "rejected")


class DOVEConfig(DPOConfig):
    """DOVE hyperparameters: DPO's plus the joint-likelihood switch (defaults: official ``dove/train.py``)."""

    beta: float = Field(0.1, gt=0, description="β, DPO temperature on the joint log-ratios (official train.py: 0.1)")
    joint_distribution: bool = Field(
        True,
        description="score instruction + response tokens, log π(I, R) (DOVE); False scores the response only "
        "(DPO with per-side prompts; the official flag's default is False, DOVE runs set it True)",
    )


def DOVECollator(pad_token_id: int, max_length: int | None, truncation_mode: str, joint: bool):  # noqa: N802
    """The core's :class:`~trl_plus.SequencesCollator` on per-side prompts: ``[chosen_1..B, rejected_1..B]``
    sequences ``prompt_ids + completion_ids`` of each side. ``completion_mask`` marks the scored tokens: the response
    (``joint=False``) or every token but the first, which nothing predicts (``joint=True``)."""
    from trl_plus import SequencesCollator, prompt_completion

    def sequences(example):
        out = []
        for side in SIDES:
            ids, mask = prompt_completion(example[f"{side}_prompt_ids"], example[f"{side}_ids"])
            out.append((ids, [0] + [1] * (len(ids) - 1)) if joint else (ids, mask))
        return out

    return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode, side_names=SIDES)


class DOVE(DPO):
    """DPO on joint log-likelihoods log π(I, R) of (instruction, response) pairs with a prompt per side."""

    name = "dove"
    taxonomy = {"data.quality": "heterogeneity", "data.feedback": "pair", "learning.paradigm": "offline",
                "constraint.reference": "fixed", "property": (), "scope": "text", "source": "inferred"}
    paper = Paper(
        "Comparing Bad Apples to Good Oranges: Aligning Large Language Models via Joint Preference Optimization",
        "2404.00530",
        code="Hritikbansal/dove",
    )
    summary = "DPO on joint log π(instruction, response) of pairs whose instructions may differ"
    Config = DOVEConfig
    data_fields = ("chosen_prompt", "chosen", "rejected_prompt", "rejected")
    tokenized_columns = ("chosen_prompt_ids", "chosen_ids", "rejected_prompt_ids", "rejected_ids")
    example_data = {"path": "recipes/data/dove_quickstart_prefs.jsonl"}  # per-side prompts, joint + conditional

    def tokenize(self, example: dict[str, Any], tokenizer) -> dict[str, list[int]]:
        """Tokenize each side as TRL's DPOTrainer tokenizes a pair (EOS appended to plain-text responses), with
        that side's own prompt: columns ``chosen_prompt_ids``, ``chosen_ids``, ``rejected_prompt_ids``,
        ``rejected_ids``."""
        from trl_plus import tokenize_completions

        out = {}
        for side in SIDES:
            ids = tokenize_completions(tokenizer, example[f"{side}_prompt"], {side: example[side]})
            out[f"{side}_prompt_ids"], out[f"{side}_ids"] = ids["prompt_ids"], ids[side]
        return out

    def collator(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
        """A :class:`DOVECollator` scoring instruction + response (``joint_distribution``) or the response only."""
        return DOVECollator(pad_token_id, max_length, truncation_mode, joint=self.config.joint_distribution)


@hookimpl
def register_methods(register):
    """Register ``dove``."""
    register(DOVE)
