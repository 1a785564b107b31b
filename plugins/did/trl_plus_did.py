"""DID — the entropy of the Differential Information Distribution between the policy and its reference, a drift
monitor (a trl-plus metric; "Differential Information: An Information-Theoretic Perspective on Preference
Optimization", arXiv 2505.23761).

The DID from π_ref to π is the normalised likelihood ratio q(y) = (π(y)/π_ref(y)) / Σ_y' π(y')/π_ref(y') (the
paper's Theorem 3.2); its entropy H(q) says whether training sharpens (low H) or smooths (high H) the policy. Over
sequences the normaliser is intractable, so this metric reports a **token proxy, our own (inferred; the paper's
estimator on real data was not found)**: at every scored position t, with z the next-token logits,

    q_t = softmax(z_θ,t − z_ref,t)      (exactly π_θ(·|s_t)/π_ref(·|s_t) normalised over the vocabulary)
    H_t = −Σ_v q_t(v) log q_t(v) = logsumexp(d_t) − Σ_v q_t(v) d_t(v),   d_t = z_θ,t − z_ref,t

and H̄ = the mean of H_t over a response's scored tokens, averaged over the responses. π_θ = π_ref gives q_t uniform
and H_t = log V exactly; a constant added to either model's logits at a position changes nothing.

The metric reads the policy's logits and the reference's at the scored positions only (``[M, V]`` each, never
``[K, B, T, V]``) and computes H_t in chunks of positions.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from trl_plus import MethodConfig, Metric, Needs, Paper, hookimpl


class DIDConfig(MethodConfig):
    chunk: int = Field(256, ge=1, description="scored positions per softmax chunk (memory: chunk × V float64)")


def did_entropy(policy_logits: Any, reference_logits: Any, chunk: int = 256) -> Any:
    """``[M]`` entropies H_t of q_t = softmax(z_θ − z_ref) from ``[M, V]`` logits (float64), ``chunk`` rows at a time
    (the token proxy of the DID entropy: ours, inferred)."""
    import torch

    if policy_logits.shape != reference_logits.shape:
        raise ValueError(f"did: policy logits {tuple(policy_logits.shape)} and reference logits "
                         f"{tuple(reference_logits.shape)} differ (the reference must share the policy's tokenizer)")
    out = []
    for start in range(0, policy_logits.shape[0], chunk):
        d = policy_logits[start : start + chunk].double() - reference_logits[start : start + chunk].double()
        q = d.softmax(-1)
        out.append(torch.logsumexp(d, -1) - (q * d).sum(-1))
    return torch.cat(out) if out else policy_logits.new_zeros(0, dtype=torch.float64)


def did_distribution(policy_logits: Any, reference_logits: Any) -> Any:
    """``[..., V]`` the token DID q = softmax(z_θ − z_ref) (for small inputs: tests, inspection)."""
    return (policy_logits.double() - reference_logits.double()).softmax(-1)


def label_logps(logits: Any, labels: Any, chunk: int) -> Any:
    """``[M]`` float64 log-softmax of ``logits [M, V]`` at ``labels [M]``, ``chunk`` rows at a time."""
    import torch

    out = []
    for i in range(0, logits.shape[0], chunk):
        rows = logits[i : i + chunk].double()
        picked = rows.gather(-1, labels[i : i + chunk].long().clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(rows, -1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float64)


class DID(Metric):
    """Mean token DID entropy H̄ of softmax(z_θ − z_ref) over the scored tokens of chosen and rejected responses
    (our token proxy), next to the responses' log-probs and log-ratios (likelihood displacement)."""

    name = "did"
    summary = "DID entropy of softmax(z_θ − z_ref) per response token (token proxy, inferred): a drift monitor"
    paper = Paper("Differential Information: An Information-Theoretic Perspective on Preference Optimization",
                  "2505.23761")  # fmt: skip
    needs = Needs(reference="no", scored_logits=True, teachers={"reference": "logits"})
    Config = DIDConfig

    def batch(self, ctx) -> dict[str, Any]:
        import torch

        reference = ctx.frozen["reference"].logits
        entropy = did_entropy(ctx.scored_logits(), reference, self.config.chunk)  # [M]
        grid = ctx.unscored(entropy)  # [K, B, T], zeros off the scored tokens
        mask = ctx.mask.double()
        tokens = mask.sum(-1)  # [K, B]
        mean = (grid.double() * mask).sum(-1) / tokens.clamp(min=1)
        mean = mean.masked_fill(tokens == 0, float("nan"))  # a response with no scored token has no H̄
        ref_logps = ctx.unscored(label_logps(reference, ctx.scored(ctx.labels), self.config.chunk)).sum(-1)
        ratios = ctx.logps().double() - ref_logps  # the reference's log-probs from the same logits: one forward
        return {
            "entropy_chosen": mean[0], "entropy_rejected": mean[1],
            "tokens_chosen": tokens[0], "tokens_rejected": tokens[1],
            "log_ratio_chosen": ratios[0], "log_ratio_rejected": ratios[1],
            "logps_chosen": ctx.logps()[0].double(), "logps_rejected": ctx.logps()[1].double(),
            "vocab": torch.full(tokens[0].shape, reference.shape[-1], dtype=torch.float64),
        }  # fmt: skip

    def summarize(self, values) -> dict[str, float]:
        import torch

        def mean(key):
            rows = torch.stack(values[key]).double()
            rows = rows[~rows.isnan()]
            return rows.mean().item() if rows.numel() else float("nan")

        chosen = [v for v in values["entropy_chosen"] if not v.isnan()]
        rejected = [v for v in values["entropy_rejected"] if not v.isnan()]
        both = torch.stack(chosen + rejected).double().mean().item() if chosen or rejected else float("nan")
        out = {"entropy": both, "entropy/chosen": mean("entropy_chosen"), "entropy/rejected": mean("entropy_rejected"),
               "log_ratio/chosen": mean("log_ratio_chosen"), "log_ratio/rejected": mean("log_ratio_rejected"),
               "logps/chosen": mean("logps_chosen"), "logps/rejected": mean("logps_rejected")}  # fmt: skip
        if values.get("vocab"):
            out["max_entropy"] = math.log(int(values["vocab"][0]))  # log V: the entropy of π_θ = π_ref
        return out

    def artefacts(self, values, out_dir) -> list:
        import csv

        path = out_dir / "did.csv"
        keys = ["index", "entropy_chosen", "entropy_rejected", "tokens_chosen", "tokens_rejected",
                "log_ratio_chosen", "log_ratio_rejected"]  # fmt: skip
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(keys)
            for row in zip(*(values[k] for k in keys)):
                writer.writerow([int(row[0])] + [f"{float(v):.6f}" for v in row[1:]])
        return [path]


@hookimpl
def register_metrics(register):
    register(DID)
