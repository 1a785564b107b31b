"""Curry-DPO — Enhancing Alignment using Curriculum Learning & Ranked Preferences (Pattnaik et al., EMNLP 2024,
arXiv 2403.07230; v2 calls it Curri-DPO).

Each prompt comes with K rated responses. Sorted by score, R1 ≥ R2 ≥ … ≥ RK, they give K−1 pairs (R1, Rj), the
best against each other one; a pair's difficulty is its score gap (a large gap is easy). Stage k trains plain DPO on
the k-th easiest pair of every prompt, and before each stage after the first the reference becomes the policy
trained so far (π_ref ← π_θ, the paper's "the model trained in iteration 1 is the reference in iteration 2"):

    stage k:  L = mean_i −log σ(β Δ_i),   Δ_i = [ℓθ(y_w) − ℓref_k(y_w)] − [ℓθ(y_l) − ℓref_k(y_l)],
              ref_1 = the starting (SFT) policy,  ref_{k+1} = π_θ at the end of stage k.

Pairs with a zero gap are dropped. The loss is the core ``dpo``'s; this plugin is the pair construction
(:meth:`CurryDPO.prepare_data`) and the stages (:meth:`CurryDPO.stages`); the trainer runs the stages with a fresh
optimiser each and refreshes the reference in every reference mode (a frozen copy, a frozen ``ref`` LoRA adapter,
or recomputed precomputed columns).
"""

from __future__ import annotations

from pydantic import Field

from trl_plus import DPO, DPOConfig, ListField, Needs, Paper, Stage, TrlPlusError, hookimpl


class CurryDPOConfig(DPOConfig):
    """Curry-DPO hyperparameters: DPO's, plus the curriculum's."""

    refresh_reference: bool = Field(
        True, description="π_ref ← π_θ before every stage after the first (the paper's iterative Curry-DPO)"
    )
    min_gap: float = Field(
        0.0, ge=0, description="pairs whose score gap is at most this are dropped (0: only ties, as the card infers)"
    )
    max_stages: int | None = Field(
        None, ge=1, description="train only the first (easiest) stages; None: all K−1 (the paper: 3 with K = 4)"
    )


def curriculum_pairs(responses: list, scores: list[float], min_gap: float = 0.0) -> list[dict]:
    """The best response against each other one, easy → hard: ``[{chosen, rejected, score_gap, stage}]`` with stage
    1 the largest score gap. Ties keep the input order (the first of equal scores is "best"); pairs whose gap is
    ``<= min_gap`` are dropped, and the remaining ones are numbered 1, 2, ... in order."""
    order = sorted(range(len(scores)), key=lambda k: -scores[k])  # stable: ties keep the input order
    best = order[0]
    others = sorted(order[1:], key=lambda k: -(scores[best] - scores[k]))  # largest gap first; stable
    pairs = [k for k in others if scores[best] - scores[k] > min_gap]
    return [{"chosen": responses[best], "rejected": responses[k], "score_gap": float(scores[best] - scores[k]),
             "stage": stage} for stage, k in enumerate(pairs, 1)]  # fmt: skip


class CurryDPO(DPO):
    """DPO on (best, j) pairs of ranked responses, one stage per difficulty rank, the reference refreshed between."""

    name = "curry-dpo"
    taxonomy = {"data.quality": "distinguishability", "data.feedback": "list", "learning.paradigm": "offline",
                "constraint.reference": "dynamic-reference", "property": (), "scope": "text",
                "survey": ("distinguishability", "offline", "dynamic-reference"), "source": "survey"}
    family = "listwise-ranking"
    paper = Paper("Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked Preferences", "2403.07230")
    summary = "DPO on best-vs-rest pairs of ranked responses, easy → hard in stages, π_ref ← π_θ between stages"
    needs = Needs(reference="yes", list_fields=(ListField("responses", dtype="text"),
                                                ListField("scores", same_length_as="responses")))  # fmt: skip
    Config = CurryDPOConfig
    data_fields = ("prompt",)
    example_data = {"path": "recipes/data/curry_sample.jsonl"}

    def prepare_data(self, dataset, split):
        """K rated responses per prompt -> up to K−1 pair rows (``prompt``, ``chosen``, ``rejected``, ``score_gap``,
        ``stage``); the raw ``responses`` and ``scores`` columns are removed."""
        min_gap = self.config.min_gap

        def expand(batch):
            rows = {"prompt": [], "chosen": [], "rejected": [], "score_gap": [], "stage": []}
            for prompt, responses, scores in zip(batch["prompt"], batch["responses"], batch["scores"]):
                if len(responses) < 2:
                    continue
                for pair in curriculum_pairs(responses, scores, min_gap):
                    if self.config.max_stages is None or pair["stage"] <= self.config.max_stages:
                        rows["prompt"].append(prompt)
                        for key in ("chosen", "rejected", "score_gap", "stage"):
                            rows[key].append(pair[key])
            return rows

        return dataset.map(expand, batched=True, remove_columns=dataset.column_names,
                           desc=f"Building curriculum pairs ({split})")  # fmt: skip

    def stages(self, dataset):
        """One stage per pair rank present in the data (1 = the easiest pairs of every prompt), in order."""
        if "stage" not in dataset.column_names:
            raise TrlPlusError("curry-dpo: the training rows have no 'stage' column (prepare_data builds it)")
        refresh = self.config.refresh_reference
        return [Stage(str(k), rows=lambda row, k=k: row["stage"] == k, refresh_reference=refresh and k > 1)
                for k in sorted(set(dataset["stage"]))]  # fmt: skip


@hookimpl
def register_methods(register):
    register(CurryDPO)
