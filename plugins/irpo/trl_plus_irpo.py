"""IRPO — In-context Ranking Preference Optimization (Wu et al., COLM 2025, arXiv 2504.15477; official code
rohan2810/In-context-Ranking-Preference-Optimization, ``rdpo_loss`` in ``trainers.py``, config key ``rdpo``).

One example is a prompt and a list of n items written into ONE response, ``item_1 , item_2 , … item_n </s>``; each
item carries a graded relevance y and a rank (its position in the ideal list). With per-token log-probs ℓ_t:

    S(k) = mean_{t ∈ item k} ℓ_t            (policy S_θ, reference S_ref; separators, EOS and prompt excluded)
    r_k  = S_θ(k) − S_ref(k)
    w_k  = (2^{y_k} − 1) / log2(1 + rank_k)                                    (weight_scheme 0)
    L_k  = log( (1/(n−1)) Σ_{j≠k} exp(β (r_j − r_k)) )                          (normalize_negatives)
    ℓ(x) = (1/n) Σ_k w_k · softplus(L_k)                                         (item_reduction mean)
    loss = mean over the examples of the batch                                   (official: sum)

The j = k exclusion is an exact −inf mask (the code subtracts 100 before multiplying by β, which leaks for small β).
Items that ``max_length`` cut entirely are masked out (n counts the remaining ones). ``rank`` is derived from the
relevance (descending, ties by input order) when the data has no ``rank`` column.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

from pydantic import Field

from trl_plus import (
    ListField,
    LossContext,
    LossOutput,
    Method,
    MethodConfig,
    Needs,
    Paper,
    TrlPlusError,
    hookimpl,
)

#: The token-aligned column of item ids: ``k`` on item k's tokens, ``NO_ITEM`` on prompt, separators and EOS.
ITEM_IDS = "item_ids"
NO_ITEM = -1


class IRPOConfig(MethodConfig):
    """IRPO hyperparameters (defaults: the official code's ``rdpo`` loss, README / ``scripts/train.sh``)."""

    beta: float = Field(1.0, gt=0, description="β, temperature on the item log-ratios (official README/train.sh: 1.0)")
    weight_scheme: Literal[0, 1, 2] = Field(
        0,
        description="item weight (official loss.ablation): 0 = (2^y − 1)/log2(1 + rank); 1 = 1/log2(1 + rank); "
        "2 = (2^y − 1)/rank",
    )
    normalize_negatives: bool = Field(
        True, description="the 1/(n − 1) inside the log of L_k (official code); False = the plain log-sum-exp"
    )
    item_reduction: Literal["mean", "sum"] = Field(
        "mean", description="over the items of one example: mean over all n items (official code) or sum"
    )
    batch_reduction: Literal["mean", "sum"] = Field(
        "mean", description="over the examples of a batch: mean, or sum (official code: micro-batch size × mean)"
    )
    item_pooling: Literal["mean", "sum"] = Field(
        "mean", description="item score from its token log-probs: mean (official average_log_prob=True) or sum"
    )
    separator: str = Field(",", description="the token written between items (official: the tokenizer's ',')")
    max_prompt_length: int | None = Field(
        None, gt=0, description="cut longer prompts to this many tokens, keeping the start (official: 256); None: none"
    )


# -- data ---------------------------------------------------------------------------------------------------------


def check_lists(items: list, relevance: list, rank: list | None, row: int) -> None:
    """The values of one row that the core's type and length checks cannot see: at least two items, no empty or
    duplicate item, relevance ≥ 0, rank ≥ 1 (a one-line :class:`TrlPlusError` naming the row and the fix)."""
    if len(items) < 2:
        raise TrlPlusError(f"row {row}: column 'items' has {len(items)} item(s); IRPO contrasts each item with the "
                           "others of its list: give at least 2")  # fmt: skip
    seen: dict[str, int] = {}
    for k, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise TrlPlusError(f"row {row}: column 'items' entry {k} is empty: every item must be non-empty text")
        key = item.strip()
        if key in seen:
            raise TrlPlusError(f"row {row}: column 'items' lists {key!r} twice (entries {seen[key]} and {k}): "
                               "remove the duplicate (each item must appear once per list)")  # fmt: skip
        seen[key] = k
    if relevance is not None:
        bad = [y for y in relevance if not (isinstance(y, (int, float)) and math.isfinite(y) and y >= 0)]
        if bad:
            raise TrlPlusError(f"row {row}: column 'relevance' has {bad[0]!r}: relevance labels are numbers ≥ 0 "
                               "(e.g. 2 = ground truth, 1 = partially relevant, 0 = irrelevant)")  # fmt: skip
    if rank is not None:
        bad = [v for v in rank if not (isinstance(v, int) and v >= 1)]
        if bad:
            raise TrlPlusError(f"row {row}: column 'rank' has {bad[0]!r}: ranks are positions 1, 2, … in the "
                               "ideal list (or drop the column to derive them from relevance)")  # fmt: skip


def item_separator_ids(tokenizer, separator: str) -> list[int]:
    """The token id(s) written between items: the separator as one vocabulary token (official
    ``convert_tokens_to_ids(",")``), else its tokenization without special tokens."""
    token = tokenizer.convert_tokens_to_ids(separator)
    if isinstance(token, int) and token != tokenizer.unk_token_id:
        return [token]
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TrlPlusError(f"irpo: separator {separator!r} tokenizes to nothing: choose another method_args.separator")
    return ids


def tokenize_list(example: dict[str, Any], tokenizer, separator: str = ",",
                  max_prompt_length: int | None = None) -> dict[str, list[int]]:  # fmt: skip
    """``prompt_ids``, ``completion_ids`` = item_1 ⟨sep⟩ item_2 … item_n ⟨eos⟩ (each item tokenized on its own, no
    special tokens, as the official ``tokenize_batch_element``) and ``item_ids``, one per completion token: ``k`` on
    item k's tokens, −1 on separators and EOS."""
    from trl_plus import tokenize_completions

    prompt_ids = tokenize_completions(tokenizer, example["prompt"], {})["prompt_ids"]
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[:max_prompt_length]
    sep = item_separator_ids(tokenizer, separator)
    completion, item_ids = [], []
    items = example["items"]
    for k, item in enumerate(items):
        ids = tokenizer(item, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TrlPlusError(f"irpo: item {item!r} tokenizes to no token: every item must be non-empty text")
        end = [tokenizer.eos_token_id] if k == len(items) - 1 else sep
        completion += ids + end
        item_ids += [k] * len(ids) + [NO_ITEM] * len(end)
    return {"prompt_ids": prompt_ids, "completion_ids": completion, ITEM_IDS: item_ids}


def IRPOCollator(pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):  # noqa: N802
    """The core's :class:`~trl_plus.SequencesCollator` with ONE sequence per example, prompt + list, scoring the list,
    and its per-token ``item_ids`` (−1 on the prompt) cut and padded with the ids."""
    from trl_plus import Sequence, SequencesCollator

    def sequences(example):
        prompt, completion = example["prompt_ids"], example["completion_ids"]
        return [Sequence(prompt + completion, [0] * len(prompt) + [1] * len(completion),
                         {ITEM_IDS: [NO_ITEM] * len(prompt) + list(example[ITEM_IDS])})]  # fmt: skip

    return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode, side_names=("list",))


# -- the objective --------------------------------------------------------------------------------------------------


def ideal_rank(relevance, mask):
    """``[B, n]`` ranks 1..n of each example's items sorted by relevance descending, ties by input order (the
    official ideal list); padded entries sort last."""
    import torch

    keys = relevance.masked_fill(~mask, float("-inf"))
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(1, keys.size(-1) + 1, device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def item_weights(relevance, rank, scheme: int):
    """``[B, n]`` NDCG-style item weights: 0: (2^y − 1)/log2(1 + rank); 1: 1/log2(1 + rank); 2: (2^y − 1)/rank."""
    rank = rank.to(relevance.dtype).clamp(min=1)  # padded entries (rank 0) are masked by the caller
    gain = 2.0**relevance - 1
    if scheme == 1:
        return 1 / (1 + rank).log2()
    if scheme == 2:
        return gain / rank
    return gain / (1 + rank).log2()


def item_logits(rewards, mask, beta: float, normalize_negatives: bool = True):
    """``(L [B, n], defined [B, n])``: ``L_k = log((1/(n−1)) Σ_{j≠k} exp(β(r_j − r_k)))`` over the real items
    ``j ≠ k`` of each example (an exact −inf mask on the diagonal and on padded or cut items; n = the real items),
    and where it is defined (a real item with at least one real other item; elsewhere L is 0)."""
    import torch

    mask = mask.bool()
    size = rewards.size(-1)
    logits = beta * (rewards.unsqueeze(-2) - rewards.unsqueeze(-1))  # [B, k, j] = β (r_j − r_k)
    others = mask.unsqueeze(-2) & ~torch.eye(size, dtype=torch.bool, device=rewards.device)
    defined = mask & others.any(-1)
    # finite rows where L is undefined, so that no NaN reaches the backward pass
    logits = logits.masked_fill(~others, float("-inf")).masked_fill(~defined.unsqueeze(-1), 0.0)
    lse = torch.logsumexp(logits, dim=-1)
    if normalize_negatives:
        lse = lse - (mask.sum(-1, keepdim=True) - 1).clamp(min=1).to(rewards.dtype).log()
    return lse.masked_fill(~defined, 0.0), defined


def irpo_losses(rewards, weights, mask, beta: float, normalize_negatives: bool = True,
                item_reduction: str = "mean"):  # fmt: skip
    """Per-example losses ``[B]`` from item rewards ``r`` ``[B, n]``, weights ``w`` and the mask of real items:
    ``ℓ_k = w_k·softplus(L_k)`` (:func:`item_logits`) reduced over the real items by mean (over all n, irrelevant
    ones included, as the official code) or sum. An example with fewer than two real items has loss 0."""
    import torch
    import torch.nn.functional as F

    logits, defined = item_logits(rewards, mask, beta, normalize_negatives)
    per_item = torch.where(defined, weights * F.softplus(logits), torch.zeros_like(logits))
    total = per_item.sum(-1)
    if item_reduction == "sum":
        return total
    return total / mask.bool().sum(-1).clamp(min=1).to(rewards.dtype)


def ndcg(scores, relevance, mask):
    """``[B]`` NDCG of each example's items ordered by ``scores`` (descending), gain 2^y − 1, discount log2(1 + i);
    NaN where the list has no relevant item."""
    import torch

    gain = (2.0**relevance - 1).masked_fill(~mask, 0.0)
    discount = torch.arange(2, scores.size(-1) + 2, device=scores.device, dtype=scores.dtype).log2()
    order = torch.sort(scores.masked_fill(~mask, float("-inf")), dim=-1, descending=True, stable=True).indices
    dcg = (gain.gather(-1, order) / discount).sum(-1)
    ideal = (gain.sort(-1, descending=True).values / discount).sum(-1)
    return dcg / ideal  # 0/0 = NaN: no relevant item


def _masked_mean(values, mask):
    """``[B]`` mean of ``values`` over ``mask`` per row (NaN where the row has none)."""
    return (values * mask).sum(-1) / mask.sum(-1)


class IRPO(Method):
    """Listwise DPO over the items of one response: each item's log-ratio against all others, NDCG-weighted."""

    name = "irpo"
    taxonomy = {"data.feedback": "list", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "property": (), "scope": "text", "source": "inferred"}
    family = "listwise-ranking"
    paper = Paper("In-context Ranking Preference Optimization", "2504.15477",
                  code="rohan2810/In-context-Ranking-Preference-Optimization")  # fmt: skip
    summary = "listwise DPO over items written in one response: softmax-vs-rest per item, weighted by NDCG gain/rank"
    needs = Needs(
        reference="yes",
        list_fields=(
            ListField("items", dtype="text"),
            ListField("relevance", same_length_as="items"),
            ListField("rank", dtype="int", same_length_as="items", required=False),
        ),
        token_fields=(ITEM_IDS,),
    )
    Config = IRPOConfig
    data_fields = ("prompt",)
    sequences_per_example = 1
    tokenized_columns = ("prompt_ids", "completion_ids", ITEM_IDS)
    example_data = {"path": "recipes/data/irpo_sample.jsonl"}
    tokenize = staticmethod(tokenize_list)  # with the config's separator and prompt cut: see __init__

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        cfg = self.config
        self.tokenize = functools.partial(tokenize_list, separator=cfg.separator,
                                          max_prompt_length=cfg.max_prompt_length)  # fmt: skip

    # -- data -----------------------------------------------------------------------------------------------
    def prepare_data(self, dataset, split: str):
        """Check each list (at least two items, none empty or duplicated, relevance ≥ 0, rank ≥ 1, ``rank`` in every
        row or in none); the rows are unchanged (idempotent)."""
        columns = dataset.column_names
        items = dataset["items"]
        relevance = dataset["relevance"] if "relevance" in columns else [None] * len(items)
        ranks = dataset["rank"] if "rank" in columns else [None] * len(items)
        given = [r is not None for r in ranks]
        if any(given) and not all(given):
            row = given.index(False) + 1
            raise TrlPlusError(f"row {row}: column 'rank' is missing while other rows have it: give a rank list in "
                               "every row, or drop the column to derive ranks from relevance")  # fmt: skip
        for row, (its, rel, rk) in enumerate(zip(items, relevance, ranks), 1):
            check_lists(its, rel, rk, row)
        return dataset

    def collator(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
        """An :class:`IRPOCollator`: one sequence per example with its per-token item ids."""
        return IRPOCollator(pad_token_id, max_length, truncation_mode)

    # -- the objective --------------------------------------------------------------------------------------
    def item_scores(self, ctx: LossContext, values):
        """``[B, n]`` item scores: the mean (or sum) of ``values`` ``[1, B, T]`` over each item's scored tokens."""
        size = ctx.batch["relevance"].size(-1)
        return ctx.pool(values, ctx.tokens[ITEM_IDS], size, reduce=self.config.item_pooling)[0]

    def items_present(self, ctx: LossContext):
        """``[B, n]`` bool: real list entries with at least one scored token left after ``max_length``."""
        size = ctx.batch["relevance"].size(-1)
        kept = ctx.segment_mask(ctx.tokens[ITEM_IDS], size)[0]
        return kept & ctx.batch["relevance_mask"].to(kept.device)

    def loss(self, ctx: LossContext) -> LossOutput:
        """The batch mean (or sum) of :func:`irpo_losses`; metrics: the margin (mean r of relevant items minus mean
        r of irrelevant ones), the policy ranking's NDCG, items per list and the fraction cut by ``max_length``."""
        import torch

        cfg = self.config
        if ctx.ref_token_logps is None:
            raise RuntimeError("irpo needs reference log-probs but the run has no reference model")
        dtype, device = ctx.token_logps.dtype, ctx.token_logps.device
        listed = ctx.batch["relevance_mask"].to(device)
        relevance = ctx.batch["relevance"].to(device, dtype)
        rank = ctx.batch["rank"].to(device) if "rank" in ctx.batch else ideal_rank(relevance, listed)
        present = self.items_present(ctx)
        policy = self.item_scores(ctx, ctx.token_logps)
        rewards = policy - self.item_scores(ctx, ctx.ref_token_logps)
        weights = item_weights(relevance, rank, cfg.weight_scheme).masked_fill(~present, 0.0)
        losses = irpo_losses(rewards, weights, present, cfg.beta, cfg.normalize_negatives, cfg.item_reduction)
        loss = losses.sum() if cfg.batch_reduction == "sum" else losses.mean()

        with torch.no_grad():
            r = rewards.detach()
            relevant, irrelevant = present & (relevance > 0), present & (relevance <= 0)
            margins = _masked_mean(r, relevant) - _masked_mean(r, irrelevant)
            scored = ndcg(policy.detach(), relevance, present)
            metrics = {
                "irpo/margin": _nanmean(margins),
                "irpo/reward_relevant": _nanmean(_masked_mean(r, relevant)),
                "irpo/reward_irrelevant": _nanmean(_masked_mean(r, irrelevant)),
                "irpo/ndcg": _nanmean(scored),
                "irpo/items": present.sum(-1).to(dtype).mean(),
                "irpo/items_cut": 1 - present.sum().to(dtype) / listed.sum().clamp(min=1).to(dtype),
            }
        return LossOutput(loss=loss, metrics=metrics)


def _nanmean(values):
    """The mean of the finite entries (0 when there is none)."""
    import torch

    finite = torch.isfinite(values)
    return values[finite].mean() if finite.any() else values.new_zeros(())


@hookimpl
def register_methods(register):
    """Register ``irpo``."""
    register(IRPO)
