"""The core's metric ``pairs``, registered through the same hook as a plugin's (``register_metrics``), and the
three accuracy conventions every pairwise figure uses.

Three conventions of "the share of pairs ranked right" coexist in the literature and in this library; they give
different numbers on the same pairs whenever there are ties (an untrained policy equal to its reference ties every
implicit reward at 0), so each is named apart (:func:`pair_accuracy`'s ``ties``):

- ``"half"``: a tie counts one half — the held-out table of ``trl-plus eval`` / ``eval_report.json`` (chance = 0.5);
- ``"lose"``: strict ``>`` — TRL's ``rewards/accuracies`` and DPORM accuracy (policy == reference gives 0);
- ``"win"``: ``≥`` — ranking accuracy (Chen et al. 2024, Theorem 4.1).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..contract import LossContext, MethodConfig, Metric, Needs

Ties = Literal["half", "lose", "win"]


def pair_accuracy(better: Any, worse: Any, ties: Ties = "half") -> Any:
    """``[N]`` per-pair accuracy of ``better > worse`` as floats (tensors of any float dtype): 1 when ranked right,
    0 when wrong, and a tie counted as ``ties`` says (``"half"`` → 0.5, ``"lose"`` → 0, ``"win"`` → 1). Take the
    mean for the accuracy."""
    right = (better > worse).to(better.dtype if better.is_floating_point() else None)
    tied = (better == worse).to(right.dtype)
    return right + {"half": 0.5, "lose": 0.0, "win": 1.0}[ties] * tied


def pair_figures(chosen: Any, rejected: Any, lengths: Any, reference: Any = None, beta: float = 0.1) -> dict:
    """The held-out figures of one model from per-pair sequence log-probs ``chosen``, ``rejected`` ``[N]``, completion
    ``lengths`` ``[N, 2]`` and, when given, the reference's ``[N, 2]`` log-probs (see ``trl_plus.run.evaluate``):
    likelihood ranking accuracy (ties ½; also per token), mean log-probs, and against the reference the implicit-
    reward accuracy (ties ½), margin ``β·Δ`` and the mean log-ratio ``log πθ/πref`` per completion."""
    lengths = lengths.clamp(min=1)
    out = {
        "likelihood_accuracy": pair_accuracy(chosen, rejected).mean().item(),
        "normalized_likelihood_accuracy": pair_accuracy(chosen / lengths[:, 0], rejected / lengths[:, 1]).mean().item(),
        "logps/chosen": chosen.mean().item(),
        "logps/rejected": rejected.mean().item(),
    }
    if reference is not None:
        ratios = (chosen - reference[:, 0], rejected - reference[:, 1])
        margins = beta * (ratios[0] - ratios[1])
        out["reward_accuracy"] = pair_accuracy(margins, margins.new_zeros(())).mean().item()
        out["reward_margin"] = margins.mean().item()
        out["log_ratio"] = (ratios[0] + ratios[1]).mean().item() / 2
    return out


def length_figures(lengths: Any) -> dict[str, float]:
    """Completion lengths ``[N, 2]`` (chosen, rejected) of the pairs, in tokens."""
    chosen, rejected = lengths[:, 0], lengths[:, 1]
    return {
        "pairs": float(len(chosen)),
        "chosen_tokens": chosen.mean().item(),
        "rejected_tokens": rejected.mean().item(),
        "chosen_longer": (chosen > rejected).double().mean().item(),
    }


class PairsConfig(MethodConfig):
    beta: float = Field(0.1, gt=0, description="β of the implicit reward β·(log πθ − log πref) (DPO's default 0.1)")


class Pairs(Metric):
    """Today's held-out table as a metric: how the model ranks chosen vs rejected, by likelihood and, when the run has
    a reference, by implicit reward (the figures of ``eval_report.json``, ties counted ½) and the pairs' lengths."""

    name = "pairs"
    summary = "held-out pair ranking: likelihood and implicit-reward accuracy (ties ½), margin, log-ratio, lengths"
    needs = Needs(reference="optional")
    Config = PairsConfig

    def batch(self, ctx: LossContext) -> dict[str, Any]:
        import torch

        values = {"logps": ctx.logps().double().T, "lengths": ctx.lengths.double().T}  # [B, 2] each
        if ctx.ref_token_logps is not None:
            values["ref_logps"] = ctx.ref_logps().double().T
        return {key: torch.as_tensor(value) for key, value in values.items()}

    def summarize(self, values) -> dict[str, float]:
        import torch

        logps, lengths = torch.stack(values["logps"]), torch.stack(values["lengths"])
        reference = torch.stack(values["ref_logps"]) if values.get("ref_logps") else None
        return pair_figures(logps[:, 0], logps[:, 1], lengths, reference, self.config.beta) | length_figures(lengths)


METRICS = (Pairs,)
