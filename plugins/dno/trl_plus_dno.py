"""DNO — Direct Nash Optimization: Teaching Language Models to Self-Improve with General Preferences (Rosset et al.,
arXiv 2404.03715; no official code: the paper's experiments used TRL's DPO).

Batched on-policy iterations. For iteration t (reference π_t = the policy at the iteration's start), on the t-th
disjoint prompt slice: K samples per prompt from π_t (top-p 0.95, temperature 0.7) plus one gold (teacher) answer;
a judge scores all K + 1 (paper: GPT-4-Turbo, a 6-point rubric); large-margin pairs are built (a positive scores
≥ 5; the negative scores ≥ 2 lower, ≥ 1 when the positive is a policy sample; samples with many repeated n-grams
are automatic negatives); rows of earlier iterations are replayed (≤ 30 % from t−1, 15 % from t−2: the recipe's
``iterations.replay``). The loss, with Δ = η[(ℓθ(y1) − ℓ_t(y1)) − (ℓθ(y2) − ℓ_t(y2))] (token sums):

    DNO-Prct (Eq. 13, what the experiments ran):  L = mean −log σ(Δ)                  (DPO, β := η)
    Algorithm 1 (Eq. 8, soft targets):            L = mean −[z log σ(Δ) + (1 − z) log σ(−Δ)],  z = σ(r_t(y1) − r_t(y2))

with r_t(y) the win-rate of y against the other K candidates of its prompt under the judge's scores.
"""

from __future__ import annotations

from typing import Any, Literal

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
    hookimpl,
)


class DNOConfig(MethodConfig):
    """DNO hyperparameters; defaults are the paper's Section 5 (6-point rubric thresholds)."""

    beta: float = Field(0.1, gt=0, description="η, the log-ratio scale (paper: 0.1 or 0.05; 'beta' in its tables)")
    target: Literal["hard", "soft"] = Field(
        "hard", description="hard: DNO-Prct, z = 1 (DPO); soft: Algorithm 1's z = σ(r_t(y1) − r_t(y2)) (Eq. 8)")
    positive_min: float = Field(5.0, description="the score a positive must reach (paper: 5 of 6)")
    margin: float = Field(2.0, ge=0, description="how much lower a negative scores than a gold positive (paper: 2)")
    student_margin: float = Field(
        1.0, ge=0, description="the margin when the positive is a policy sample (paper: relaxed to 1)")
    repeat_ngram: int = Field(4, ge=1, description="n of the repeated-n-gram check (words; reconstructed)")
    max_repeats: int | None = Field(
        None, ge=1, description="a policy sample whose most frequent n-gram occurs more often than this is an "
        "automatic negative (the paper gives no threshold; None: off)")  # fmt: skip


def repeats(text: str, n: int) -> int:
    """How often the most frequent word ``n``-gram of ``text`` occurs (0 for fewer than ``n`` words)."""
    from collections import Counter

    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return max(grams.values(), default=0)


def win_rates(scores: list[float]) -> list[float]:
    """r_t per candidate: the fraction of the other candidates it beats under ``scores`` (a tie counts ½)."""
    k = len(scores) - 1
    return [sum(1.0 if s > o else 0.5 if s == o else 0.0 for j, o in enumerate(scores) if j != i) / k if k else 0.5
            for i, s in enumerate(scores)]  # fmt: skip


class DNO(OnlineMethod, DPO):
    """Iterative DPO (reference = previous iterate) on large-margin pairs judged among K samples and a gold answer."""

    name = "dno"
    taxonomy = {"data.quality": "distinguishability", "data.feedback": "pair", "learning.paradigm": "online",
                "learning.objective": "self-play", "constraint.reference": "dynamic-reference", "property": (), "scope": "text",
                "survey": ("self-play",), "source": "survey"}  # fmt: skip
    paper = Paper("Direct Nash Optimization: Teaching Language Models to Self-Improve with General Preferences",
                  "2404.03715")  # fmt: skip
    summary = "batched on-policy iterative DPO on large-margin pairs among K samples + a gold answer, judged"
    needs = Needs(
        reference="yes",
        rollout=Rollout(n=5, sources=("policy", "column:gold"), when="iteration",
                        decoding={"do_sample": True, "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 1024}),
        optional_fields=("target",),
        precomputable_reference=False,
    )  # fmt: skip
    data_fields = ("prompt", "gold")
    example_data = {"path": "recipes/data/dno_prompts.jsonl"}
    Config = DNOConfig

    def automatic_negatives(self, rollouts: Rollouts) -> list[bool]:
        """Per row: a policy sample with too many repeated n-grams (``max_repeats``), never a positive."""
        limit = self.config.max_repeats
        return [limit is not None and not s.startswith("column:") and repeats(str(c), self.config.repeat_ngram) > limit
                for s, c in zip(rollouts.source, rollouts.completions)]  # fmt: skip

    def make_examples(self, rollouts: Rollouts) -> list[dict[str, Any]]:
        """Every (positive, negative) pair of each prompt's candidates, in candidate order: a positive scores at
        least ``positive_min`` and is not an automatic negative; its negative scores ``margin`` lower (a gold, i.e.
        ``column:`` positive) or ``student_margin`` lower (a sampled positive), or is an automatic negative. Each row
        carries ``target`` = σ(r_t(y1) − r_t(y2)) (read when ``target: soft``)."""
        import math

        c = self.config
        reward = rollouts.reward().tolist()
        flagged = self.automatic_negatives(rollouts)
        rows = []
        for g in range(rollouts.num_groups):
            members = [i for i in rollouts.rows_of(g) if not math.isnan(reward[i])]
            rates = dict(zip(members, win_rates([reward[i] for i in members])))
            for p in members:
                if flagged[p] or reward[p] < c.positive_min:
                    continue
                margin = c.margin if rollouts.source[p].startswith("column:") else c.student_margin
                for q in members:
                    if q != p and (flagged[q] or reward[p] - reward[q] >= margin):
                        rows.append({"prompt_ids": rollouts.prompt_ids[p], "chosen_ids": rollouts.completion_ids[p],
                                     "rejected_ids": rollouts.completion_ids[q],
                                     "target": 1 / (1 + math.exp(rates[q] - rates[p]))})  # fmt: skip
        return rows

    def loss(self, ctx: LossContext) -> LossOutput:
        """Mean over pairs of Eq. 8's cross-entropy between z (1 with ``target: hard``) and σ(Δ); rewards η·log-ratios."""
        import torch.nn.functional as F

        eta = self.config.beta
        ratios = ctx.logps() - ctx.ref_logps()  # [2, B]
        delta = eta * (ratios[0] - ratios[1])
        if self.config.target == "soft":
            z = ctx.batch["target"].to(delta)
            losses = -(z * F.logsigmoid(delta) + (1 - z) * F.logsigmoid(-delta))
        else:
            losses = -F.logsigmoid(delta)
        return LossOutput(loss=losses.mean(), rewards=eta * ratios.detach())


@hookimpl
def register_methods(register):
    """Register ``dno``."""
    register(DNO)
