"""More-is-Less — how linearly separable the chosen and the rejected responses of a preference data set are, before
training (a trl-plus metric; "More is Less: The Pitfalls of Multi-Model Synthetic Preference Data in DPO Safety
Alignment", arXiv 2504.02193).

The paper finds that multi-model preference data (chosen from a stronger model, rejected from the target) is highly
linearly separable and invites shortcut learning in safety DPO; single-model data is not. Its exact probe was not
found: **the procedure below is our recommended implementation (inferred)**.

1. Features: the mean, over a response's completion tokens, of the model's hidden states at those tokens (layer
   ``layer`` of ``outputs.hidden_states``; the last by default) for the sequence prompt + response.
2. Rows grouped by prompt into ``k_folds`` folds (a prompt's responses, all its pairs, in one fold).
3. Per fold, on the other folds: a logistic probe (full-batch gradient descent on the mean binary cross-entropy
   + ``l2``·‖w‖², zero init, bias not penalised; features standardised with the training folds' mean and std;
   "chosen" iff score > 0, a score of exactly 0 counts ½) and the training-free mean-difference probe
   (d = μ_w − μ_l, m = (μ_w + μ_l)/2, "chosen" iff (h − m)·d > 0, ties wrong, ‖d‖ = 0 → accuracy 0.5); held-out
   accuracy and AUC (ties ½) of each response's label, averaged over folds.

≈ 0.5: chosen and rejected look alike (the paper's safer single-model regime); ≈ 1.0: trivially separable.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import Field

from trl_plus import MethodConfig, Metric, Needs, Paper, TrlPlusError, hookimpl, pair_accuracy

logger = logging.getLogger(__name__)


class MoreIsLessConfig(MethodConfig):
    layer: int = Field(-1, description="which of outputs.hidden_states is pooled (-1: the last layer; not in the paper)")
    k_folds: int = Field(5, ge=2, description="cross-validation folds, grouped by prompt (ours: 5)")
    steps: int = Field(2000, ge=1, description="gradient-descent steps of the logistic probe (card's example: 2000)")
    lr: float = Field(0.1, gt=0, description="learning rate of the logistic probe (card's example: 0.1)")
    l2: float = Field(1e-3, ge=0, description="L2 penalty l2·‖w‖² of the logistic probe (card's example: 1e-3)")
    standardize: bool = Field(True, description="standardise features with the training folds' mean and std (ours)")
    warn_threshold: float = Field(0.9, gt=0, le=1, description="held-out probe accuracy above which the data are "
                                  "flagged as separable (inferred: the paper gives none)")  # fmt: skip
    seed: int = Field(0, description="seed of the prompt-to-fold assignment")


# -- the probes (float64 tensors) ----------------------------------------------------------------------------------


def mean_difference(chosen: Any, rejected: Any) -> tuple[Any, Any]:
    """``(d, m)`` of the mean-difference probe: d = μ_w − μ_l, m = (μ_w + μ_l)/2 (features ``[N, H]`` each)."""
    mu_w, mu_l = chosen.mean(0), rejected.mean(0)
    return mu_w - mu_l, (mu_w + mu_l) / 2


def mean_difference_accuracy(chosen: Any, rejected: Any, probe: tuple[Any, Any] | None = None) -> float:
    """Accuracy of "chosen iff (h − m)·d > 0" over the responses ``chosen``, ``rejected`` ``[N, H]`` (a tie is an
    error; ‖d‖ = 0 gives 0.5). ``probe``: ``(d, m)`` fitted elsewhere (default: on these features)."""
    d, m = mean_difference(chosen, rejected) if probe is None else probe
    if not bool((d != 0).any()):
        return 0.5
    right = ((chosen - m) @ d > 0).sum() + ((rejected - m) @ d < 0).sum()
    return (right.double() / (len(chosen) + len(rejected))).item()


def logistic_probe(features: Any, labels: Any, steps: int = 2000, lr: float = 0.1, l2: float = 1e-3):
    """``(w, b, loss)``: full-batch gradient descent from zero on mean BCE(σ(X·w + b), y) + l2·‖w‖² (the bias not
    penalised; float64); ``loss`` is the objective at the last step, before its update."""
    import torch
    import torch.nn.functional as F

    x, y = features.double(), labels.double()
    w, b = x.new_zeros(x.shape[1]), x.new_zeros(())
    loss = None
    for step in range(steps):
        z = x @ w + b
        if step == steps - 1:
            loss = (F.binary_cross_entropy_with_logits(z, y) + l2 * (w * w).sum()).item()
        error = (torch.sigmoid(z) - y) / len(y)  # d mean-BCE / dz
        w, b = w - lr * (x.T @ error + 2 * l2 * w), b - lr * error.sum()
    return w, b, loss


def probe_accuracy(chosen_scores: Any, rejected_scores: Any) -> float:
    """Share of responses a probe labels right ("chosen" iff score > 0; a score of exactly 0 counts ½)."""
    zero = chosen_scores.new_zeros(())
    right = pair_accuracy(chosen_scores, zero).sum() + pair_accuracy(zero, rejected_scores).sum()
    return (right / (len(chosen_scores) + len(rejected_scores))).item()


def auc(positive: Any, negative: Any) -> float:
    """Area under the ROC curve of scores ``positive`` vs ``negative`` (Mann–Whitney; ties ½)."""
    return pair_accuracy(positive[:, None], negative[None, :], ties="half").mean().item()


def prompt_folds(prompts: list, k: int, seed: int = 0) -> list[int]:
    """The fold (``0 .. min(k, groups) − 1``) of each row: rows with the same prompt share a fold; the distinct
    prompts, shuffled with ``seed``, are dealt round-robin."""
    import torch

    keys = [json.dumps(p, sort_keys=True, default=str) for p in prompts]
    groups = list(dict.fromkeys(keys))
    if len(groups) < 2:
        raise TrlPlusError(f"more-is-less: k-fold by prompt needs at least 2 distinct prompts; the data have "
                           f"{len(groups)}")  # fmt: skip
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(k, len(groups))
    fold_of = {groups[g]: i % k for i, g in enumerate(order)}
    return [fold_of[key] for key in keys]


def cross_validate(chosen: Any, rejected: Any, folds: list[int], config: MoreIsLessConfig) -> dict[str, Any]:
    """Held-out figures of both probes over ``folds`` (one fold id per pair), averaged over folds, and each pair's
    out-of-fold logistic scores ``[N, 2]``."""
    import torch

    fold = torch.tensor(folds)
    scores = torch.zeros(len(folds), 2, dtype=torch.float64)
    per_fold = []
    for f in sorted(set(folds)):
        test, train = fold == f, fold != f
        tw, tl = chosen[train], rejected[train]
        mean, std = torch.cat([tw, tl]).mean(0), torch.cat([tw, tl]).std(0, correction=0)
        if not config.standardize:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
        std = torch.where(std > 0, std, torch.ones_like(std))
        def norm(x):
            return (x - mean) / std

        x = torch.cat([norm(tw), norm(tl)])
        y = torch.cat([torch.ones(len(tw)), torch.zeros(len(tl))])
        w, b, _ = logistic_probe(x, y, config.steps, config.lr, config.l2)
        sw, sl = norm(chosen[test]) @ w + b, norm(rejected[test]) @ w + b
        scores[test, 0], scores[test, 1] = sw, sl
        per_fold.append({
            "accuracy": probe_accuracy(sw, sl),
            "auc": auc(sw, sl),
            "mean_difference_accuracy": mean_difference_accuracy(chosen[test], rejected[test],
                                                                 mean_difference(tw, tl)),
        })  # fmt: skip
    figures = {key: sum(r[key] for r in per_fold) / len(per_fold) for key in per_fold[0]}
    return {**figures, "folds": len(per_fold), "scores": scores}


# -- the metric -----------------------------------------------------------------------------------------------------


class MoreIsLess(Metric):
    """Linear separability of chosen vs rejected (pooled completion-token hidden states) on the training data:
    k-fold by prompt, a torch logistic probe and the mean-difference probe (our implementation of the paper's
    check)."""

    name = "more-is-less"
    summary = "linear separability of chosen vs rejected hidden states (k-fold by prompt; before training)"
    paper = Paper("More is Less: The Pitfalls of Multi-Model Synthetic Preference Data in DPO Safety Alignment",
                  "2504.02193")  # fmt: skip
    needs = Needs(reference="no", hidden_states=True)
    Config = MoreIsLessConfig
    split = "train"

    def batch(self, ctx) -> dict[str, Any]:
        """Per pair the mean hidden state (layer ``layer``) over each response's completion tokens ``[B, H]``."""
        layers = ctx.outputs.hidden_states
        if not -len(layers) <= self.config.layer < len(layers):
            raise TrlPlusError(f"more-is-less: layer {self.config.layer} is outside the model's {len(layers)} hidden "
                               f"states (0 = the embeddings, -1 = the last layer)")  # fmt: skip
        hidden = layers[self.config.layer]  # [K*B, L, H]
        k, b, t = ctx.mask.shape
        grid = hidden[:, -t:].reshape(k, b, t, -1).double()  # the hidden state *at* each label token
        mask = ctx.mask.double().unsqueeze(-1)
        pooled = (grid * mask).sum(2) / mask.sum(2).clamp(min=1)  # [K, B, H]
        return {"chosen": pooled[0], "rejected": pooled[1], "tokens": ctx.mask.sum(-1).T.double()}  # tokens [B, 2]

    def _probe(self, values) -> dict[str, Any]:
        import torch

        cached = getattr(self, "_cached", None)
        if cached is not None and cached[0] is values:
            return cached[1]
        kept = [i for i, tokens in enumerate(values["tokens"]) if bool((tokens > 0).all())]  # cut to nothing: out
        chosen = torch.stack([values["chosen"][i] for i in kept])
        rejected = torch.stack([values["rejected"][i] for i in kept])
        index = [int(values["index"][i]) for i in kept]
        prompts = [self.data[i]["prompt"] for i in index]
        folds = prompt_folds(prompts, self.config.k_folds, self.config.seed)
        result = cross_validate(chosen, rejected, folds, self.config)
        result["fold_of"] = folds
        result["index"] = index
        result["in_sample"] = mean_difference_accuracy(chosen, rejected)
        self._cached = (values, result)
        return result

    def summarize(self, values) -> dict[str, float]:
        result = self._probe(values)
        separable = result["accuracy"] >= self.config.warn_threshold
        if separable:
            logger.warning("more-is-less: chosen and rejected are linearly separable (held-out probe accuracy %.3f "
                           ">= %.2f): the model may learn a shortcut", result["accuracy"], self.config.warn_threshold)
        return {
            "probe_accuracy": result["accuracy"], "probe_auc": result["auc"],
            "mean_difference_accuracy": result["mean_difference_accuracy"],
            "mean_difference_accuracy/in_sample": result["in_sample"],
            "pairs": float(len(result["index"])), "folds": float(result["folds"]), "separable": float(separable),
        }  # fmt: skip

    def artefacts(self, values, out_dir) -> list:
        """``folds.csv``: each pair's row index, fold and out-of-fold logistic scores of chosen and rejected."""
        import csv

        result = self._probe(values)
        path = out_dir / "folds.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "fold", "score_chosen", "score_rejected"])
            for i, f, s in zip(result["index"], result["fold_of"], result["scores"].tolist()):
                writer.writerow([i, f, f"{s[0]:.6f}", f"{s[1]:.6f}"])
        return [path]


@hookimpl
def register_metrics(register):
    register(MoreIsLess)
