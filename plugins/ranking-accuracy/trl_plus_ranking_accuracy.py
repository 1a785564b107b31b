"""Ranking accuracy — Preference Learning Algorithms Do Not Learn Preference Rankings (2024, arXiv
2405.19534; official code angie-chen55/pref-learning-ranking-acc).

Does the policy itself rank the chosen completion above the rejected one? Per pair, with ℓ(y) = Σ_t log πθ(y_t|x,
y_<t) summed over the completion's tokens:

    R   = 1[ℓθ(y_w) ≥ ℓθ(y_l)]                          (≥: Theorem 4.1's boundary; ties "win")
    R̃   = the same on ℓ(y)/|y|                           (length-normalised)
    α = 0.5 (a rater tie): correct iff |πθ(y_w) − πθ(y_l)| < 0.01 on probabilities; α < 0.5: the reverse order

With the reference (ℓref) and the raters' share α preferring y_w, the idealized ranking accuracy of a perfectly
optimised DPO/RLHF policy (Bradley–Terry with the ground truth α):

    R*  = 1[(ℓref(y_w) − ℓref(y_l)) + (1/β) log(α/(1−α)) > 0],   α clamped to [ε, 1 − ε], ε = 1e-3

as min / median / max over β ∈ {0.01, 0.1, 1, 5, 10}; and each pair's difficulty (Theorem 4.1): with
c = ℓref(y_l) − ℓref(y_w), the policy ranks the pair right (R = 1) iff L_DPO ≤ τ(c) = softplus(−βc).
"""

from __future__ import annotations

import csv
import math
import statistics
from typing import Any

from pydantic import Field

from trl_plus import LossContext, MethodConfig, Metric, Needs, Paper, hookimpl, pair_accuracy

ALPHA = "alpha"


class RankingAccuracyConfig(MethodConfig):
    beta: float = Field(0.1, gt=0, description="β of the DPO loss and of the difficulty τ(c) = softplus(−βc) "
                                               "(the evaluated run's β; DPO's default 0.1)")  # fmt: skip
    betas: tuple[float, ...] = Field((0.01, 0.1, 1.0, 5.0, 10.0), min_length=1,
                                     description="β grid of the idealized ranking accuracy R* (paper and code: "
                                                 "0.01, 0.1, 1, 5, 10; min/median/max reported)")  # fmt: skip
    eps: float = Field(1e-3, gt=0, lt=0.5, description="α = 0 or 1 is clamped to [eps, 1 − eps] (code: 1e-3)")
    tie_tolerance: float = Field(0.01, ge=0, description="an α = 0.5 pair is ranked right iff |πθ(y_w) − πθ(y_l)| "
                                                         "< tie_tolerance on probabilities (paper App. C: 0.01)")


def ranking_correct(chosen: Any, rejected: Any, alpha: Any = None, tie_tolerance: float = 0.01) -> Any:
    """``[N]`` 1.0 where a pair is ranked right by the scores ``chosen`` / ``rejected`` (log-probs, ``[N]``): chosen
    ≥ rejected; with the raters' share ``alpha`` ``[N]`` (NaN: unknown, read as chosen preferred), α < 0.5 asks for
    rejected ≥ chosen and α = 0.5 for |exp(chosen) − exp(rejected)| < ``tie_tolerance``."""
    import torch

    right = pair_accuracy(chosen, rejected, ties="win")
    if alpha is None:
        return right
    alpha = alpha.to(right.dtype)
    tie = ((chosen.exp() - rejected.exp()).abs() < tie_tolerance).to(right.dtype)
    right = torch.where(alpha < 0.5, pair_accuracy(rejected, chosen, ties="win"), right)
    return torch.where(alpha == 0.5, tie, right)


def idealized_log_ratio(ref_chosen: Any, ref_rejected: Any, alpha: Any, betas: tuple[float, ...],
                        eps: float = 1e-3) -> Any:  # fmt: skip
    """``[N, G]`` log π*(y_w)/π*(y_l) = (ℓref(y_w) − ℓref(y_l)) + (1/β)·log(α/(1−α)) for each β of the grid (the
    optimum of the KL-regularised objective under a Bradley–Terry reward with the raters' share α, clamped to
    [eps, 1 − eps])."""
    import torch

    alpha = alpha.to(ref_chosen.dtype).clamp(eps, 1 - eps)
    beta = torch.tensor(betas, dtype=ref_chosen.dtype, device=ref_chosen.device)
    return (ref_chosen - ref_rejected)[:, None] + torch.log(alpha / (1 - alpha))[:, None] / beta


def idealized_correct(ref_chosen: Any, ref_rejected: Any, alpha: Any, betas: tuple[float, ...],
                      eps: float = 1e-3) -> Any:  # fmt: skip
    """``[N, G]`` per pair and β of the grid: does the idealized policy π* ∝ πref·exp(r/β) (Bradley–Terry reward with
    the raters' share α) rank the pair as the raters' majority does? 1/0; NaN where α is unknown or 0.5 (ties are
    left out of R*, as in the paper's main figure)."""
    import torch

    alpha = alpha.to(ref_chosen.dtype)
    log_ratio = idealized_log_ratio(ref_chosen, ref_rejected, alpha, betas, eps)
    right = torch.where(alpha[:, None] > 0.5, log_ratio > 0, log_ratio < 0).to(ref_chosen.dtype)
    undefined = (alpha.isnan() | (alpha == 0.5))[:, None]
    return right.masked_fill(undefined, math.nan)


def difficulty(ref_chosen: Any, ref_rejected: Any, beta: float) -> tuple[Any, Any]:
    """``(c, τ)`` ``[N]`` each: the reference's log-ratio c = ℓref(y_l) − ℓref(y_w) and Theorem 4.1's loss threshold
    τ(c) = −log σ(βc) = softplus(−βc) (the DPO loss when πθ(y_w) = πθ(y_l); small τ: hard to flip)."""
    import torch

    c = ref_rejected - ref_chosen
    return c, torch.nn.functional.softplus(-beta * c)


def dpo_loss(chosen: Any, rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> Any:
    """``[N]`` the DPO loss −log σ(β[(ℓθ − ℓref)(y_w) − (ℓθ − ℓref)(y_l)]) per pair."""
    import torch

    return torch.nn.functional.softplus(-beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


class RankingAccuracy(Metric):
    """Likelihood ranking accuracy R (≥ on raw likelihoods), its length-normalised form, the idealized ranking
    accuracy R* of a perfectly optimised DPO policy over a β grid, and Theorem 4.1's per-pair difficulty."""

    name = "ranking-accuracy"
    summary = ("likelihood ranking accuracy (≥), idealized accuracy R* over a β grid (needs alpha), Theorem 4.1's "
               "per-pair difficulty softplus(−βc)")  # fmt: skip
    paper = Paper("Preference Learning Algorithms Do Not Learn Preference Rankings", "2405.19534",
                  code="angie-chen55/pref-learning-ranking-acc")  # fmt: skip
    needs = Needs(reference="optional", optional_fields=(ALPHA,))
    Config = RankingAccuracyConfig

    def batch(self, ctx: LossContext) -> dict[str, Any]:
        import torch

        config = self.config
        logps, lengths = ctx.logps().double(), ctx.lengths.double()  # [2, B]
        mean = logps / lengths.clamp(min=1)
        alpha = ctx.batch.get(ALPHA)
        alpha = torch.full_like(logps[0], math.nan) if alpha is None else alpha.to(logps)
        values = {
            "logps": logps.T, "lengths": lengths.T, "alpha": alpha,
            "correct": ranking_correct(logps[0], logps[1], alpha, config.tie_tolerance),
            "correct_normalized": ranking_correct(mean[0], mean[1], alpha, config.tie_tolerance),
        }  # fmt: skip
        if ctx.ref_token_logps is not None:
            ref = ctx.ref_logps().double()
            ref_mean = ref / lengths.clamp(min=1)
            c, tau = difficulty(ref[0], ref[1], config.beta)
            values.update({
                "ref_logps": ref.T, "c": c, "tau": tau,
                "dpo_loss": dpo_loss(logps[0], logps[1], ref[0], ref[1], config.beta),
                "reference_correct": ranking_correct(ref[0], ref[1], alpha, config.tie_tolerance),
                "idealized": idealized_correct(ref[0], ref[1], alpha, config.betas, config.eps),
                "idealized_normalized": idealized_correct(ref_mean[0], ref_mean[1], alpha, config.betas, config.eps),
            })  # fmt: skip
        return values

    def summarize(self, values) -> dict[str, float]:
        import torch

        def stack(key):
            return torch.stack(values[key])

        correct = stack("correct")
        out = {"pairs": float(len(correct)), "accuracy": correct.mean().item(),
               "normalized_accuracy": stack("correct_normalized").mean().item()}  # fmt: skip
        alpha = stack("alpha")
        if not alpha.isnan().all():
            out["ties"] = (alpha == 0.5).double().mean().item()
        if not values.get("c"):
            return out
        reference = stack("reference_correct")
        out.update({
            "reference_accuracy": reference.mean().item(),
            "dpo_loss": stack("dpo_loss").mean().item(),
            "difficulty": stack("tau").mean().item(),
            "reference_prefers_rejected": (stack("c") > 0).double().mean().item(),
        })  # fmt: skip
        for before, b in (("correct", 1), ("incorrect", 0)):  # the reference's ranking -> the policy's
            for after, a in (("correct", 1), ("incorrect", 0)):
                out[f"{before}_to_{after}"] = ((reference == b) & (correct == a)).double().mean().item()
        for key, name, plain, gap in (
            ("idealized", "idealized_accuracy", "accuracy", "alignment_gap"),
            ("idealized_normalized", "idealized_normalized_accuracy", "normalized_accuracy", "normalized_alignment_gap"),
        ):
            grid = stack(key)  # [N, G], NaN where alpha is unknown or 0.5
            defined = ~grid[:, 0].isnan()
            if not defined.any():
                continue  # no alpha: R* is undefined (the card: n/a rather than assuming alpha = 1)
            per_beta = grid[defined].mean(0).tolist()
            for beta, value in zip(self.config.betas, per_beta):
                out[f"{name}/beta_{beta:g}"] = value
            out[f"{name}/min"], out[f"{name}/max"] = min(per_beta), max(per_beta)
            out[f"{name}/median"] = statistics.median(per_beta)
            out[gap] = out[f"{name}/median"] - out[plain]  # the paper's alignment gap: median R* − R
        return out

    def artefacts(self, values, out_dir) -> list[Any]:
        """``difficulty.csv``: one row per pair (its row index, the policy's and the reference's log-probs, lengths,
        α, R, R̃, c, τ(c), L_DPO, the reference's R), hardest first (smallest τ) when there is a reference."""
        import torch

        path = out_dir / "difficulty.csv"
        has_ref = bool(values.get("c"))
        rows = []
        for i, index in enumerate(values["index"]):
            logps, lengths = values["logps"][i].tolist(), values["lengths"][i].tolist()
            row = {"index": int(index), "logp_chosen": logps[0], "logp_rejected": logps[1],
                   "tokens_chosen": int(lengths[0]), "tokens_rejected": int(lengths[1]),
                   "alpha": values["alpha"][i].item(), "correct": values["correct"][i].item(),
                   "correct_normalized": values["correct_normalized"][i].item()}  # fmt: skip
            if has_ref:
                ref = values["ref_logps"][i].tolist()
                row.update({"ref_logp_chosen": ref[0], "ref_logp_rejected": ref[1], "c": values["c"][i].item(),
                            "tau": values["tau"][i].item(), "dpo_loss": values["dpo_loss"][i].item(),
                            "reference_correct": values["reference_correct"][i].item()})  # fmt: skip
            rows.append(row)
        if has_ref:
            order = torch.tensor([row["tau"] for row in rows]).argsort(stable=True).tolist()
            rows = [rows[i] for i in order]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["index"])
            writer.writeheader()
            writer.writerows(rows)
        return [path]


@hookimpl
def register_metrics(register):
    register(RankingAccuracy)
