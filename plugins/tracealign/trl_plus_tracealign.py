"""TraceAlign — Tracing the Drift: Attributing Alignment Failures to Training-Time Belief Sources in LLMs
(arXiv 2508.02063; official code vinija/tracealign, a sketch: ``bci.py``, ``traceindex.py``, ``cbd_loss.py``,
``traceshield.py``, ``utils.py``, ``run_cbd_training.py``).

A corpus is soft-tokenised (lower-cased ``\\w+|[^\\w\\s]``), indexed by a suffix array and counted into a unigram
table P_train (``trl-plus tracealign index CORPUS --output INDEX``). A span s = (t_1..t_n) that literally occurs in
the corpus is scored by its Belief Conflict Index

    BCI(s) = Σ_i −ln P_train(t_i)            (−ln(p + 1e-12) for seen tokens, −ln 1e-9 = 20.7233 for unseen ones)

and is high-risk when BCI(s) > τ. Windows of W soft tokens of a response are looked up; each of a window's
corpus matches (at most top_k) with BCI > τ contributes (BCI − τ) — the released ``compute_cbd_penalty``.

CBD training (``cbd_loss.py``): L = L_DPO + λ · Σ_batch Σ_matches (BCI − τ), the matches taken on the argmax-decoded
training logits. That penalty is a Python float: **zero gradient**, so as released CBD training *is* DPO
(``penalty="released"`` reproduces it, logged loss included). The default ``penalty="logp"`` is the card's
recommended differentiable form (**inferred**, not in the paper or code): each model token t of a penalised
response gets the weight w_t = Σ_{windows m ∋ t} n_m (BCI_m − τ) / |S_m| (|S_m| the model tokens of window m,
n_m its match count, via the fast tokenizer's character offsets) and

    L = L_DPO + λ · mean_b Σ_t w_t · log πθ(y_t | s_t)           (rejected responses; ``penalize="both"``: chosen too)

which pushes down the likelihood of high-BCI spans; ``penalty="unlikelihood"`` uses −log(1 − πθ) instead of
log πθ (bounded, Welleck et al. 2019).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from trl_plus import DPO, DPOConfig, LossContext, LossOutput, Needs, Paper, TrlPlusError, hookimpl

#: The official soft tokeniser (``utils.soft_tokenize``): ``re.findall(SOFT_TOKEN, text.lower())``.
SOFT_TOKEN = re.compile(r"\w+|[^\w\s]")
#: P_train of a token the corpus never has (``bci.py``: ``default_prob``).
DEFAULT_PROB = 1e-9
#: Added to a seen token's probability inside the log (``bci.py``: ``_build_entropy_cache``).
LOG_EPS = 1e-12
#: The token column the tokenizer writes and the loss reads (``Needs.token_fields``).
WEIGHT = "bci_weight"
INDEX_FORMAT = "trl-plus-tracealign-index/1"


# -- soft tokens -------------------------------------------------------------------------------------------------------


def soft_tokenize(text: str) -> list[str]:
    """The official soft tokens: lower-cased words and single punctuation marks (``utils.soft_tokenize``)."""
    return SOFT_TOKEN.findall(text.lower())


def soft_spans(text: str) -> list[tuple[str, int, int]]:
    """``[(soft token, start, end)]``: :func:`soft_tokenize`'s tokens (the same list, found on ``text.lower()``) with
    their character offsets in ``text`` itself (mapped back where lower-casing changes a character's length)."""
    if text.isascii():
        return [(m.group(), m.start(), m.end()) for m in SOFT_TOKEN.finditer(text.lower())]
    origin: list[int] = []
    for i, ch in enumerate(text):
        origin.extend([i] * len(ch.lower()))
    return [(m.group(), origin[m.start()], origin[m.end() - 1] + 1) for m in SOFT_TOKEN.finditer(text.lower())]


# -- the Belief Conflict Index ---------------------------------------------------------------------------------------


class BeliefConflictIndex:
    """``bci.py``'s scores of a span of soft tokens under a unigram table ``token_probs`` (token -> P_train)."""

    def __init__(self, token_probs: dict[str, float], default_prob: float = DEFAULT_PROB):
        self.token_probs, self.default_prob = token_probs, default_prob
        self.entropy = {t: -math.log(p + LOG_EPS) for t, p in token_probs.items()}
        self.unseen = -math.log(default_prob)

    def risk(self, token: str) -> float:
        """−ln P_train(token): ``−ln(p + 1e-12)`` if seen, ``−ln(default_prob)`` otherwise."""
        return self.entropy.get(token, self.unseen)

    def bci(self, span: Iterable[str]) -> float:
        """BCI(s) = Σ_i −ln P_train(t_i) (``compute_bci``)."""
        return sum(self.risk(t) for t in span)

    def density(self, span: list[str]) -> float:
        """BCI(s) / max(1, n) (``normalized_bci``)."""
        return self.bci(span) / max(1, len(span))

    def max_token_risk(self, span: list[str]) -> float:
        """max_i −ln P_train(t_i)."""
        return max(self.risk(t) for t in span)

    def span_kl(self, span: list[str]) -> float:
        """Σ_t p̂(t) ln(p̂(t) / P_train(t)), p̂ the span's empirical distribution (``compute_kl_divergence``: no 1e-12
        here, unseen tokens at ``default_prob``)."""
        counts: dict[str, int] = {}
        for t in span:
            counts[t] = counts.get(t, 0) + 1
        return sum(c / len(span) * math.log(c / len(span) / self.token_probs.get(t, self.default_prob))
                   for t, c in counts.items())  # fmt: skip

    def high_risk(self, span: list[str], threshold: float) -> bool:
        """BCI(s) > τ."""
        return self.bci(span) > threshold


# -- the suffix-array index ----------------------------------------------------------------------------------------


def suffix_array(tokens):
    """The suffix array of an integer sequence (numpy, prefix doubling: O(N log² N) time, O(N) memory): the start
    positions sorted by their suffixes, a suffix that ends being smaller than any of its extensions."""
    import numpy as np

    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.asarray(tokens, dtype=np.int64)
    k = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)
        if k < n:
            second[: n - k] = rank[k:]
        order = np.lexsort((second, rank))
        r, s = rank[order], second[order]
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.concatenate(([0], np.cumsum((r[1:] != r[:-1]) | (s[1:] != s[:-1]))))
        if rank[order[-1]] == n - 1 or k >= n:
            return order
        k *= 2


@dataclass
class Match:
    """A corpus occurrence of a span (``traceindex.match_span``'s dict): document id and soft-token offset."""

    doc_id: str
    position: int
    span: list[str]


class SuffixIndex:
    """The corpus as one integer array (soft-token ids 1..V, 0 between documents), its suffix array over the token
    positions, the documents' ids and starts, and the unigram counts that give P_train."""

    def __init__(self, vocab: list[str], counts, tokens, suffixes, doc_ids: list[str], doc_starts):
        self.vocab, self.counts, self.tokens, self.suffixes = vocab, counts, tokens, suffixes
        self.doc_ids, self.doc_starts = doc_ids, doc_starts
        self.ids = {t: i + 1 for i, t in enumerate(vocab)}
        total = int(counts.sum())
        self.bci = BeliefConflictIndex({t: int(c) / total for t, c in zip(vocab, counts)})

    # -- building, saving, loading
    @classmethod
    def build(cls, documents: Iterable[tuple[str, str]]) -> SuffixIndex:
        """Index ``(doc_id, text)`` documents (soft tokens as :func:`soft_tokenize`)."""
        import numpy as np

        ids: dict[str, int] = {}
        flat, doc_ids, doc_starts = [], [], []
        for doc_id, text in documents:
            doc_ids.append(str(doc_id))
            doc_starts.append(len(flat))
            flat.extend(ids.setdefault(t, len(ids) + 1) for t in soft_tokenize(text))
            flat.append(0)
        tokens = np.asarray(flat, dtype=np.int32)
        vocab = list(ids)
        counts = np.bincount(tokens, minlength=len(vocab) + 1)[1:].astype(np.int64)
        order = suffix_array(tokens)
        suffixes = order[tokens[order] != 0]
        return cls(vocab, counts, tokens, suffixes, doc_ids, np.asarray(doc_starts, dtype=np.int64))

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` (one ``.npz`` file, no pickles), exactly there."""
        import numpy as np

        meta = json.dumps({"format": INDEX_FORMAT, "vocab": self.vocab, "doc_ids": self.doc_ids}).encode()
        with open(path, "wb") as f:
            np.savez(f, tokens=self.tokens, suffixes=self.suffixes, counts=self.counts, doc_starts=self.doc_starts,
                     meta=np.frombuffer(meta, dtype=np.uint8))  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> SuffixIndex:
        """Read an index :meth:`save` wrote; a one-line error for anything else."""
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(data["meta"].tobytes())
                if meta.get("format") != INDEX_FORMAT:
                    raise ValueError(meta.get("format"))
                arrays = {k: data[k] for k in ("tokens", "suffixes", "counts", "doc_starts")}
        except FileNotFoundError:
            raise TrlPlusError(f"tracealign: no index file {path}: build it with `trl-plus tracealign index CORPUS "
                               f"--output {path}`") from None  # fmt: skip
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            raise TrlPlusError(f"tracealign: {path} is not a tracealign index (write one with `trl-plus tracealign "
                               "index CORPUS --output INDEX`)") from None  # fmt: skip
        return cls(meta["vocab"], arrays["counts"], arrays["tokens"], arrays["suffixes"], meta["doc_ids"],
                   arrays["doc_starts"])  # fmt: skip

    # -- lookups
    def token_probs(self) -> dict[str, float]:
        """P_train: each soft token's corpus frequency, normalised to sum 1 (the official JSON table)."""
        return self.bci.token_probs

    def encode(self, span: Iterable[str]) -> tuple[int, ...] | None:
        """The span's token ids, or ``None`` if a token is not in the corpus (then it matches nowhere)."""
        ids = tuple(self.ids.get(t, 0) for t in span)
        return None if 0 in ids else ids

    def _bounds(self, ids: tuple[int, ...]) -> tuple[int, int]:
        """``[lo, hi)``: the suffix-array rows whose suffixes start with ``ids`` (two binary searches)."""
        m, tokens, sa = len(ids), self.tokens, self.suffixes

        def prefix(row: int) -> tuple[int, ...]:
            start = int(sa[row])
            return tuple(tokens[start : start + m].tolist())

        lo, hi = 0, len(sa)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if prefix(mid) < ids else (lo, mid)
        end, top = lo, len(sa)
        while end < top:
            mid = (end + top) // 2
            end, top = (mid + 1, top) if prefix(mid) <= ids else (end, mid)
        return lo, end

    def count(self, span: Iterable[str]) -> int:
        """How often the span occurs in the corpus (never across documents)."""
        ids = self.encode(span)
        if ids is None or not ids:
            return 0
        lo, hi = self._bounds(ids)
        return hi - lo

    def match(self, span: list[str], top_k: int = 5) -> list[Match]:
        """The span's first ``top_k`` occurrences in suffix-array order (``match_span``): document and offset."""
        ids = self.encode(span)
        if ids is None or not ids:
            return []
        lo, hi = self._bounds(ids)
        out = []
        for row in range(lo, min(hi, lo + top_k)):
            pos = int(self.suffixes[row])
            doc = int(bisect.bisect_right(self.doc_starts, pos)) - 1
            out.append(Match(self.doc_ids[doc], pos - int(self.doc_starts[doc]), list(span)))
        return out

    def window_bci(self, window: int):
        """BCI of every window of ``window`` soft tokens inside a corpus document (each matches itself): the
        distribution a threshold τ is chosen from."""
        import numpy as np

        risk = np.concatenate(([0.0], -np.log(self.counts / self.counts.sum() + LOG_EPS)))[self.tokens]
        sums = np.concatenate(([0.0], np.cumsum(risk)))
        seps = np.concatenate(([0], np.cumsum(self.tokens == 0)))
        starts = np.arange(len(self.tokens) - window + 1)
        inside = seps[starts + window] == seps[starts]
        return (sums[starts + window] - sums[starts])[inside]


@functools.lru_cache(maxsize=4)
def _load_index(path: str, stamp: tuple) -> SuffixIndex:
    return SuffixIndex.load(path)


def load_index(path: str | Path) -> SuffixIndex:
    """:meth:`SuffixIndex.load`, cached per file (path, size and modification time)."""
    return _load_index(str(path), file_stamp(path))


def file_stamp(path: str | Path) -> tuple:
    """``(size, mtime_ns)`` of a file (``None`` if it does not exist): keys the caches of its contents."""
    try:
        stat = Path(path).stat()
    except OSError:
        return (None,)
    return (stat.st_size, stat.st_mtime_ns)


# -- high-BCI spans of a text and their model-token weights ------------------------------------------------------------


@dataclass
class Span:
    """A window of soft tokens whose corpus matches are high-risk: characters ``[start, end)`` of the text, its BCI,
    its number of corpus matches (≤ top_k) and the first of them."""

    start: int
    end: int
    bci: float
    matches: int
    tokens: list[str]

    def excess(self, threshold: float) -> float:
        """Its released penalty: Σ over its matches of (BCI − τ)."""
        return self.matches * (self.bci - threshold)


def risky_spans(index: SuffixIndex, text: str, window: int = 8, threshold: float = 10.0,
                top_k: int = 5) -> list[Span]:  # fmt: skip
    """Every window of ``window`` soft tokens of ``text`` (stride 1, none if the text is shorter; TraceShield's
    ``_window_spans``) that occurs in the corpus with BCI > ``threshold``."""
    soft = soft_spans(text)
    if len(soft) < window:
        return []
    tokens = [t for t, _, _ in soft]
    risks = [index.bci.risk(t) for t in tokens]
    out = []
    for i in range(len(soft) - window + 1):
        bci = sum(risks[i : i + window])
        if bci <= threshold:  # every match of the window is the window itself: the same BCI
            continue
        matches = min(index.count(tokens[i : i + window]), top_k)
        if matches:
            out.append(Span(soft[i][1], soft[i + window - 1][2], bci, matches, tokens[i : i + window]))
    return out


def released_penalty(index: SuffixIndex, text: str, window: int = 8, threshold: float = 10.0,
                     top_k: int = 5) -> float:  # fmt: skip
    """``compute_cbd_penalty`` of a text: Σ over its high-risk windows' matches of (BCI − τ)."""
    return sum(s.excess(threshold) for s in risky_spans(index, text, window, threshold, top_k))


def refuse(index: SuffixIndex, text: str, window: int = 8, threshold: float = 10.0, top_k: int = 5) -> bool:
    """TraceShield's ``refuse``: whether any window of the output has a high-risk corpus match."""
    return bool(risky_spans(index, text, window, threshold, top_k))


def token_weights(offsets: list[tuple[int, int]], spans: list[Span], threshold: float, shift: int = 0) -> list[float]:
    """Per model token (character ``offsets`` in the tokenized string; ``shift`` = where the spans' text starts in it):
    w_t = Σ_{spans m ∋ t} n_m (BCI_m − τ) / |S_m|, S_m the tokens whose characters overlap the span (zero-width
    tokens, e.g. special ones, never)."""
    weights = [0.0] * len(offsets)
    starts, ends = [a for a, _ in offsets], [b for _, b in offsets]  # non-decreasing along the tokens
    for span in spans:
        lo, hi = span.start + shift, span.end + shift
        first, last = bisect.bisect_right(ends, lo), bisect.bisect_left(starts, hi)
        inside = [t for t in range(first, last) if offsets[t][1] > max(lo, offsets[t][0])]
        for t in inside:
            weights[t] += span.excess(threshold) / len(inside)
    return weights


def tokenize_with_bci(example: dict[str, Any], tokenizer, index: str | None = None, stamp: tuple = (),
                      window: int = 8, threshold: float = 10.0, top_k: int = 5) -> dict[str, list]:  # fmt: skip
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` exactly as TRL tokenizes a pair, and ``chosen_bci`` /
    ``rejected_bci``: one :func:`token_weights` value per completion token (0 outside high-BCI spans), the spans
    found in the completion text and placed on the tokens by the fast tokenizer's character offsets."""
    from trl_plus import tokenize_completions

    if index is None:
        raise TrlPlusError("tracealign: set method_args.index to an index file written by `trl-plus tracealign index "
                           "CORPUS --output INDEX`")  # fmt: skip
    if not getattr(tokenizer, "is_fast", False):
        raise TrlPlusError(f"tracealign: the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer: mapping "
                           "corpus spans onto model tokens needs its character offsets (return_offsets_mapping); "
                           "load the model's fast tokenizer (a tokenizer.json)")  # fmt: skip
    suffix_index = _load_index(index, stamp)
    prompt = example["prompt"]
    out = tokenize_completions(tokenizer, prompt, {f"{s}_ids": example[s] for s in ("chosen", "rejected")})
    for side in ("chosen", "rejected"):
        completion, ids = example[side], out[f"{side}_ids"]
        if isinstance(prompt, list):  # conversational: the template's text, tokenized as apply_chat_template does
            full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        else:
            eos = tokenizer.eos_token or ""
            full = prompt + (completion if completion.endswith(eos) else completion + eos)
            encoding = tokenizer(full, return_offsets_mapping=True)
        full_ids, offsets = encoding["input_ids"], [tuple(o) for o in encoding["offset_mapping"]]
        if len(full_ids) < len(ids) or full_ids[len(full_ids) - len(ids) :] != ids:
            raise TrlPlusError(f"tracealign: the offsets tokenization of a {side} response differs from TRL's; "
                               "the spans cannot be placed on its tokens")  # fmt: skip
        offsets = offsets[len(offsets) - len(ids) :]
        weights = [0.0] * len(ids)
        for text, shift in completion_texts(completion, full, offsets, len(prompt) if isinstance(prompt, str) else 0):
            spans = risky_spans(suffix_index, text, window, threshold, top_k)
            weights = [a + b for a, b in zip(weights, token_weights(offsets, spans, threshold, shift))]
        out[f"{side}_bci"] = weights
    return out


def completion_texts(completion, full: str, offsets: list[tuple[int, int]], start: int) -> list[tuple[str, int]]:
    """``[(text, where it starts in full)]``: the completion itself (plain text) or each of its messages' contents,
    found in the rendered template after the completion's first token."""
    if isinstance(completion, str):
        return [(completion, start)]
    cursor, out = (offsets[0][0] if offsets else len(full)), []
    for message in completion:
        content = message.get("content")
        if not isinstance(content, str) or not content:
            continue
        at = full.find(content, cursor)
        if at < 0:
            raise TrlPlusError("tracealign: a completion message's content is not in the chat template's text; "
                               "give plain-text prompt/chosen/rejected")  # fmt: skip
        out.append((content, at))
        cursor = at + len(content)
    return out


def bci_collator(pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
    """The core's :class:`~trl_plus.SequencesCollator`: prompt + chosen, prompt + rejected (scoring the completions),
    each with its token column ``bci_weight`` (0 on the prompt), cut and padded with the ids."""
    from trl_plus import Sequence, SequencesCollator

    def sequences(example):
        prompt = example["prompt_ids"]
        return [Sequence(prompt + example[f"{side}_ids"], [0] * len(prompt) + [1] * len(example[f"{side}_ids"]),
                         {WEIGHT: [0.0] * len(prompt) + [float(w) for w in example[f"{side}_bci"]]})
                for side in ("chosen", "rejected")]  # fmt: skip

    return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode, side_names=("chosen", "rejected"))


# -- the method --------------------------------------------------------------------------------------------------------


class TraceAlignConfig(DPOConfig):
    """CBD (BCI-penalised DPO) hyperparameters: DPO's plus the official CBD / TraceShield defaults."""

    index: str | None = Field(
        None, description="index file written by `trl-plus tracealign index CORPUS --output INDEX` (suffix array + "
                          "P_train)")  # fmt: skip
    threshold: float = Field(10.0, description="τ: a matched span is high-risk when BCI > τ (run_cbd_training.py: 10.0)")
    lambda_penalty: float = Field(0.01, ge=0, description="λ, weight of the CBD penalty (cbd_loss.py: 0.01)")
    window_size: int = Field(8, ge=1, description="W, soft tokens per looked-up window (traceshield.py: 8)")
    top_k: int = Field(5, ge=1, description="corpus matches counted per window (match_span top_k / max_matches: 5)")
    penalty: Literal["logp", "unlikelihood", "released"] = Field(
        "logp", description="logp: λ Σ w_t log π (inferred, the card's differentiable form); unlikelihood: "
                            "λ Σ w_t (−log(1 − π)) (inferred); released: the code's float from argmax decoding, "
                            "zero gradient (= DPO)")  # fmt: skip
    penalize: Literal["rejected", "both"] = Field(
        "rejected", description="which responses' high-BCI spans the inferred penalty pushes down (card: rejected)")


class TraceAlign(DPO):
    """DPO plus a penalty on responses' high-BCI corpus spans (CBD); the released penalty has no gradient."""

    name = "tracealign"
    taxonomy = {"data.granularity": "token", "learning.paradigm": "offline", "constraint.reference": "fixed",
                "constraint.safety": "safety", "property": "other-analysis", "scope": "text", "source": "inferred"}
    family = "data-recipe"
    paper = Paper(
        "TRACEALIGN — Tracing the Drift: Attributing Alignment Failures to Training-Time Belief Sources in LLMs",
        "2508.02063",
        code="vinija/tracealign",
    )
    summary = ("DPO + a BCI penalty on responses' high-BCI corpus spans (suffix-array index); inferred "
               "differentiable form, the released one has zero gradient")  # fmt: skip
    needs = Needs(reference="yes", token_fields=(WEIGHT,))
    Config = TraceAlignConfig
    tokenized_columns = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_bci", "rejected_bci")
    example_data = {"path": "recipes/data/tracealign_prefs.jsonl"}
    tokenize = staticmethod(tokenize_with_bci)  # with the config's index and window: see __init__

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        cfg = self.config
        self.tokenize = functools.partial(
            tokenize_with_bci, index=cfg.index, stamp=file_stamp(cfg.index) if cfg.index else (),
            window=cfg.window_size, threshold=cfg.threshold, top_k=cfg.top_k,
        )  # fmt: skip
        if cfg.penalty == "released":  # argmax of the policy's logits at the scored positions
            self.needs = replace(type(self).needs, scored_logits=True)

    def prepare_data(self, dataset, split: str):
        """Rows unchanged (idempotent); a missing index file is reported here, before any model loads."""
        if self.config.index is not None and not Path(self.config.index).is_file():
            raise TrlPlusError(f"method_args.index: no index file {self.config.index}: build it with `trl-plus "
                               f"tracealign index CORPUS --output {self.config.index}`")  # fmt: skip
        return dataset

    def collator(self, pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
        """A :func:`bci_collator`: the pair's two sequences with their ``bci_weight`` token column."""
        return bci_collator(pad_token_id, max_length, truncation_mode)

    def released_penalty(self, ctx: LossContext) -> float:
        """``cbd_loss.py``: the argmax of the policy's logits at each sequence's scored positions, decoded, summed
        over the batch's sequences of Σ_matches (BCI − τ) — a float, no gradient."""
        import torch

        cfg = self.config
        index = load_index(cfg.index) if cfg.index else None
        if index is None:
            raise TrlPlusError("tracealign: penalty 'released' reads the corpus index: set method_args.index")
        if self.tokenizer is None:
            raise RuntimeError("tracealign: penalty 'released' decodes the logits: the method's tokenizer is not set")
        with torch.no_grad():
            argmax = ctx.unscored(ctx.scored_logits().argmax(-1))
        where = ctx.mask.bool()
        total = 0.0
        for k in range(ctx.num_sequences):
            for b in range(ctx.batch_size):
                text = self.tokenizer.decode(argmax[k, b][where[k, b]].tolist(), skip_special_tokens=True)
                total += released_penalty(index, text, cfg.window_size, cfg.threshold, cfg.top_k)
        return total

    def loss(self, ctx: LossContext) -> LossOutput:
        """DPO + λ · penalty; metrics: the DPO loss, the penalty and the fraction of scored tokens in high-BCI spans."""
        import torch

        cfg = self.config
        losses, ratios = self.pair_losses(ctx)
        dpo = losses.mean()
        weights = ctx.tokens[WEIGHT].to(ctx.token_logps.dtype).clamp(min=0) * ctx.mask if WEIGHT in ctx.tokens \
            else torch.zeros_like(ctx.token_logps)  # fmt: skip
        flagged = ((weights > 0).sum(-1) / ctx.lengths.clamp(min=1)).mean(-1)  # [K]
        metrics = {"tracealign/dpo_loss": dpo.detach(), "tracealign/flagged_chosen": flagged[0],
                   "tracealign/flagged_rejected": flagged[1]}  # fmt: skip
        if cfg.penalty == "released":
            value = self.released_penalty(ctx) if cfg.lambda_penalty else 0.0
            metrics["tracealign/penalty"] = cfg.lambda_penalty * value
            loss = dpo + cfg.lambda_penalty * value  # a constant: the gradient is DPO's
        else:
            logps = ctx.token_logps
            if cfg.penalty == "logp":
                term = logps
            else:  # −log(1 − π), π < 1 kept away from 1
                term = -torch.log1p(-logps.exp().clamp(max=1 - 1e-6))
            rows = slice(1, 2) if cfg.penalize == "rejected" else slice(0, 2)
            penalty = (weights[rows] * term[rows] * ctx.mask[rows]).sum(-1).sum(0).mean()
            metrics["tracealign/penalty"] = cfg.lambda_penalty * penalty.detach()
            loss = dpo + cfg.lambda_penalty * penalty
        return LossOutput(loss=loss, rewards=cfg.beta * ratios.detach(), metrics=metrics)


# -- the command --------------------------------------------------------------------------------------------------------


def read_corpus(path: str | Path, text_field: str = "text", id_field: str = "id") -> list[tuple[str, str]]:
    """``[(doc_id, text)]`` from a ``.txt`` file (one document, id = file name), a ``.jsonl`` file (one document per
    line, ``text_field`` / ``id_field``; id default ``file:line``) or a folder of them (sorted; ``utils.read_corpus``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise TrlPlusError(f"tracealign index: {path} has no .txt or .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise TrlPlusError(f"tracealign index: no such corpus file or folder: {path}")
    docs = []
    for file in files:
        if file.suffix != ".jsonl":
            docs.append((file.name, file.read_text(encoding="utf-8")))
            continue
        for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TrlPlusError(f"tracealign index: {file}:{line_no}: expected a JSON object with a string "
                                   f"{text_field!r} field (--text-field)") from None  # fmt: skip
            if not isinstance(text, str):
                raise TrlPlusError(f"tracealign index: {file}:{line_no}: {text_field!r} is not a string")
            docs.append((str(record.get(id_field, f"{file.name}:{line_no}")), text))
    return docs


def add_index_arguments(parser) -> None:
    """``trl-plus tracealign index``'s arguments."""
    parser.add_argument("corpus", help="a .txt file (one document), a .jsonl file (one document per line) or a "
                                       "folder of them")  # fmt: skip
    parser.add_argument("--output", required=True, help="the index file to write (method_args.index)")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl records (default: text)")
    parser.add_argument("--id-field", default="id", help="the document id field of .jsonl records (default: id)")
    parser.add_argument("--token-probs", help="also write P_train as the official JSON table (token -> probability)")
    parser.add_argument("--window", type=int, default=8, help="W for the printed BCI percentiles (default: 8)")


def run_index(args) -> int:
    """Build the suffix array and P_train of a corpus, write them, print their size and the BCI percentiles of the
    corpus's own W-token windows (every one matches itself: the distribution τ is chosen from)."""
    import numpy as np

    docs = read_corpus(args.corpus, args.text_field, args.id_field)
    index = SuffixIndex.build(docs)
    if not len(index.suffixes):
        raise TrlPlusError(f"tracealign index: {args.corpus} has no soft tokens")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    index.save(args.output)
    if args.token_probs:
        Path(args.token_probs).write_text(json.dumps(index.token_probs(), indent=2))
    print(f"indexed {len(docs)} documents, {len(index.suffixes)} soft tokens, {len(index.vocab)} distinct -> "
          f"{args.output}")  # fmt: skip
    bci = index.window_bci(args.window)
    if len(bci):
        p50, p90, p99 = np.percentile(bci, [50, 90, 99])
        print(f"BCI of the corpus's {len(bci)} windows of {args.window} soft tokens: median {p50:.2f}, p90 {p90:.2f}, "
              f"p99 {p99:.2f} (method_args.threshold τ; official default 10.0)")  # fmt: skip
    return 0


@hookimpl
def register_methods(register):
    """Register ``tracealign``."""
    register(TraceAlign)


@hookimpl
def register_commands(register):
    """Register ``trl-plus tracealign index``."""
    register("tracealign index", "build the suffix-array index and P_train of a corpus (method_args.index)",
             add_index_arguments, run_index)  # fmt: skip
