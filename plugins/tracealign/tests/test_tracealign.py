"""TraceAlign: the card's BCI and CBD worked examples, the suffix array against brute force, the index command on the
shipped corpus, span -> token alignment by offsets, the released penalty (= DPO) and the inferred one (gradient only
inside high-BCI spans, with the right sign), through the real trainer, real steps, the recipe, errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_tracealign import (
    BeliefConflictIndex,
    SuffixIndex,
    TraceAlign,
    load_index,
    read_corpus,
    refuse,
    released_penalty,
    risky_spans,
    run_index,
    soft_spans,
    soft_tokenize,
    suffix_array,
    token_weights,
    tokenize_with_bci,
)

from trl_plus import DPO, TrlPlusError, tokenize_completions
from trl_plus.testing import (
    build_tokenizer,
    cli,
    logits_head,
    make_context,
    run_recipe_on_cpu,
    tiny_trainer,
    training_logs,
)

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "recipes/data/tracealign_corpus.jsonl"
PREFS = ROOT / "recipes/data/tracealign_prefs.jsonl"
CARD = {"a": 0.1, "b": 0.01, "c": 0.001}
N = 4  # pairs per batch in the trainer tests


def index_args(output, corpus=CORPUS, **kwargs):
    """The parsed arguments of `trl-plus tracealign index CORPUS --output OUTPUT` (the command's defaults)."""
    return SimpleNamespace(**{"corpus": str(corpus), "output": str(output), "text_field": "text", "id_field": "id",
                              "token_probs": None, "window": 8, **kwargs})  # fmt: skip


@pytest.fixture(scope="module")
def shipped_index(tmp_path_factory):
    """The index of the shipped corpus, built by the command's run()."""
    path = tmp_path_factory.mktemp("index") / "corpus.tracealign"
    assert run_index(index_args(path)) == 0
    return str(path)


@pytest.fixture(scope="module")
def card_index(tmp_path_factory):
    """A corpus whose P_train is the card's {a: 0.1, b: 0.01, c: 0.001} (+ d: 0.889 over 1000 tokens); "b c" once."""
    text = " ".join(["b c"] + ["b"] * 9 + ["a"] * 100 + ["d"] * 889)
    path = tmp_path_factory.mktemp("card") / "card.tracealign"
    SuffixIndex.build([("card", text)]).save(path)
    return str(path)


# -- BCI ------------------------------------------------------------------------------------------------------------


def test_card_worked_example_bci():
    bci = BeliefConflictIndex(CARD)
    assert bci.bci(["b", "c"]) == pytest.approx(11.512925, abs=1e-6)
    assert bci.density(["b", "c"]) == pytest.approx(5.756463, abs=1e-6)
    assert bci.span_kl(["b", "c"]) == pytest.approx(5.063316, abs=1e-6)
    assert bci.bci(["zz"]) == pytest.approx(20.723266, abs=1e-6) == -math.log(1e-9)
    assert bci.max_token_risk(["a", "b", "c"]) == pytest.approx(-math.log(0.001 + 1e-12), abs=1e-12)
    # additive, ≥ 0, density ≤ max token risk; high_risk monotone in τ
    spans = [["a"], ["b", "c"], ["a", "zz", "b"], ["c", "c", "a"]]
    for s in spans:
        assert bci.bci(s) == pytest.approx(sum(bci.bci([t]) for t in s), abs=1e-12) and bci.bci(s) >= 0
        assert bci.density(s) <= bci.max_token_risk(s) + 1e-12
        flags = [bci.high_risk(s, tau) for tau in (0, 5, 10, 20, 40, 80)]
        assert flags == sorted(flags, reverse=True)


def test_soft_tokens_are_the_officials_with_offsets():
    text = "Don't PUT butter, on İt!  Straße"
    assert soft_tokenize(text) == ["don", "'", "t", "put", "butter", ",", "on", "i", "̇", "t", "!", "straße"]
    assert [t for t, _, _ in soft_spans(text)] == soft_tokenize(text)
    for token, start, end in soft_spans(text):
        assert text[start:end].lower().startswith(token[0]) or token == "̇"  # offsets into the original text
    assert soft_spans("Hi, you")[1:] == [(",", 2, 3), ("you", 4, 7)]


# -- the suffix array --------------------------------------------------------------------------------------------


def test_suffix_array_and_lookups_against_brute_force():
    rng = random.Random(0)
    docs = [(f"d{i}", " ".join(rng.choice("abc") for _ in range(rng.randint(1, 30)))) for i in range(12)]
    index = SuffixIndex.build(docs)
    flat = index.tokens.tolist()
    sa = suffix_array(flat).tolist()
    assert sa == sorted(range(len(flat)), key=lambda i: flat[i:])  # lexicographic, a suffix that ends first is smaller
    tokens = {doc_id: soft_tokenize(text) for doc_id, text in docs}
    for n in (1, 2, 3, 5):
        for span in {tuple(t[i : i + n]) for t in tokens.values() for i in range(len(t) - n + 1)} | {("a",) * 9}:
            expected = sorted((d, i) for d, t in tokens.items() for i in range(len(t) - n + 1)
                              if tuple(t[i : i + n]) == span)  # fmt: skip
            found = index.match(list(span), top_k=10**6)
            assert sorted((m.doc_id, m.position) for m in found) == expected  # never across documents
            assert index.count(span) == len(expected)
            assert len(index.match(list(span), top_k=5)) == min(5, len(expected))
    assert index.match(["zz"]) == [] and index.count(["a", "zz"]) == 0
    assert sum(index.token_probs().values()) == pytest.approx(1.0, abs=1e-12)


def test_index_command_on_the_shipped_corpus(shipped_index, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli("--help")
    assert "tracealign plugin commands: index" in capsys.readouterr().out
    probs, output = tmp_path / "p_train.json", tmp_path / "sub" / "corpus.tracealign"
    assert cli("tracealign", "index", str(CORPUS), "--output", str(output), "--token-probs", str(probs)) == 0
    out = capsys.readouterr().out
    assert output.read_bytes() == Path(shipped_index).read_bytes()  # the command is run(): the same file
    assert "indexed 16 documents, 521 soft tokens, 257 distinct" in out and "median 39.99" in out
    index = load_index(shipped_index)
    # P_train is the official utils.compute_token_frequencies + normalize_token_frequencies
    counts: dict[str, int] = {}
    for _, text in read_corpus(CORPUS):
        for t in soft_tokenize(text):
            counts[t] = counts.get(t, 0) + 1
    total = sum(counts.values())
    assert json.loads(probs.read_text()) == pytest.approx({t: c / total for t, c in counts.items()}, rel=1e-12)
    assert index.token_probs() == pytest.approx({t: c / total for t, c in counts.items()}, rel=1e-12)
    [match] = index.match(soft_tokenize("put butter on the burn"))
    assert (match.doc_id, match.position) == ("forum-burns", 14)
    assert index.count(["burn"]) == 4 and index.count(["the", "burn"]) == 1
    # every corpus window matches itself: its window BCIs are what risky_spans finds in the corpus's own text
    first = read_corpus(CORPUS)[0][1]
    spans = risky_spans(index, first, window=8, threshold=0.0)
    assert len(spans) == len(soft_tokenize(first)) - 7
    assert sorted(s.bci for s in spans) == pytest.approx(sorted(index.window_bci(8)[: len(spans)]), abs=1e-9)


def test_index_command_errors(tmp_path, capsys):
    assert cli("tracealign", "index", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "x")) == 2
    assert capsys.readouterr().err == f"error: tracealign index: no such corpus file or folder: {tmp_path}/missing.txt\n"
    with pytest.raises(TrlPlusError, match="no such corpus"):
        run_index(index_args(tmp_path / "x", corpus=tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(TrlPlusError, match=r"bad.jsonl:1: expected a JSON object with a string 'text' field"):
        run_index(index_args(tmp_path / "x", corpus=bad))
    (tmp_path / "plain.txt").write_text("One document, in a text file.")
    assert read_corpus(tmp_path / "plain.txt") == [("plain.txt", "One document, in a text file.")]
    with pytest.raises(TrlPlusError, match="is not a tracealign index"):
        load_index(tmp_path / "plain.txt")
    with pytest.raises(TrlPlusError, match="no index file"):
        load_index(tmp_path / "nothing.npz")


# -- span -> token weights ------------------------------------------------------------------------------------


def word_tokenizer(words):
    """A fast word-level tokenizer (multi-character tokens, offsets from its whitespace/punctuation splitting)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.add_special_tokens(["<pad>", "<unk>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def test_offsets_place_span_weights_on_the_tiny_tokenizers_characters(shipped_index):
    tokenizer = build_tokenizer()
    assert tokenizer.is_fast  # the tiny tokenizer is a PreTrainedTokenizerFast: offsets work
    example = {"prompt": "Burn?", "chosen": "Cool it.", "rejected": "Just put butter on the burn and it will heal faster."}
    out = tokenize_with_bci(example, tokenizer, shipped_index, window=4, threshold=20.0)
    expected = tokenize_completions(tokenizer, example["prompt"], {"chosen_ids": example["chosen"],
                                                                   "rejected_ids": example["rejected"]})  # fmt: skip
    assert {k: out[k] for k in expected} == expected  # TRL's ids, unchanged
    assert out["chosen_bci"] == [0.0] * len(out["chosen_ids"])
    spans = risky_spans(load_index(shipped_index), example["rejected"], window=4, threshold=20.0)
    assert [(s.tokens, s.matches) for s in spans] == [
        (["just", "put", "butter", "on"], 1), (["it", "will", "heal", "faster"], 1), (["will", "heal", "faster", "."], 1)]
    weights, text = out["rejected_bci"], example["rejected"]
    assert len(weights) == len(text) + 1 and weights[-1] == 0  # one token per character, then EOS
    for i, w in enumerate(weights[:-1]):
        covering = [s for s in spans if s.start <= i < s.end]
        assert w == pytest.approx(sum((s.bci - 20.0) / (s.end - s.start) for s in covering), abs=1e-12)
    assert sum(weights) == pytest.approx(sum(s.excess(20.0) for s in spans), abs=1e-9)  # each span's excess, shared
    assert [w > 0 for w in weights[:-1]] == [any(s.start <= i < s.end for s in spans) for i in range(len(text))]
    # conversational rows: the content is found in the chat template's text, the same characters get the same weights
    conversation = {"prompt": [{"role": "user", "content": "Burn?"}]}
    conversation |= {side: [{"role": "assistant", "content": example[side]}] for side in ("chosen", "rejected")}
    chat = tokenize_with_bci(conversation, tokenizer, shipped_index, window=4, threshold=20.0)
    assert tokenizer.decode(chat["rejected_ids"]) == text + "</s>"
    assert chat["rejected_bci"] == weights and not any(chat["chosen_bci"])


def test_offsets_with_multi_character_tokens(shipped_index):
    text = "Sure. Just put butter on the burn, friend."
    tokenizer = word_tokenizer(["Q", "?", "Sure", ".", "Just", "put", "butter", "on", "the", "burn", ",", "friend"])
    out = tokenize_with_bci({"prompt": "Q?", "chosen": "Sure.", "rejected": text}, tokenizer, shipped_index,
                            window=4, threshold=15.0)  # fmt: skip
    words = tokenizer.convert_ids_to_tokens(out["rejected_ids"])
    assert words == ["Sure", ".", "Just", "put", "butter", "on", "the", "burn", ",", "friend", ".", "</s>"]
    spans = risky_spans(load_index(shipped_index), text, window=4, threshold=15.0)
    assert [s.tokens for s in spans] == [["just", "put", "butter", "on"], ["put", "butter", "on", "the"],
                                         ["butter", "on", "the", "burn"]]  # fmt: skip
    e = [s.excess(15.0) / 4 for s in spans]  # each span covers 4 whole words
    assert out["rejected_bci"] == pytest.approx([0, 0, e[0], e[0] + e[1], sum(e), sum(e), e[1] + e[2], e[2], 0, 0, 0,
                                                 0], abs=1e-12)  # fmt: skip
    # a token only partly inside a span counts; one touching it (end == start) does not
    assert token_weights([(0, 3), (3, 6), (6, 9)], [spans[0].__class__(4, 6, 25.0, 2, [])], 15.0) == [0, 20.0, 0]


def test_a_slow_tokenizer_and_a_missing_index_are_one_line_errors(shipped_index):
    example = {"prompt": "P", "chosen": "a", "rejected": "b"}
    with pytest.raises(TrlPlusError, match="not a fast tokenizer: .*return_offsets_mapping"):
        tokenize_with_bci(example, SimpleNamespace(is_fast=False), shipped_index)
    with pytest.raises(TrlPlusError, match="set method_args.index"):
        tokenize_with_bci(example, build_tokenizer(), None)
    with pytest.raises(TrlPlusError, match="method_args.index: no index file /no/such.idx: build it with"):
        TraceAlign(index="/no/such.idx").prepare_data(None, "train")
    for bad in ({"lambda_penalty": -1}, {"penalty": "hinge"}, {"window_size": 0}, {"top_k": 0}, {"lambda": 1}):
        with pytest.raises(ValidationError):
            TraceAlign(**bad)


def test_traceshield_refuses_only_high_risk_matched_outputs(shipped_index):
    index = load_index(shipped_index)
    assert refuse(index, "Just put butter on the burn and it will heal faster.", window=8, threshold=10.0)
    assert not refuse(index, "Cool the burn and call a doctor if it blisters badly.", window=8, threshold=10.0)
    assert not refuse(index, "zz " * 20, window=8, threshold=0.0)  # unseen tokens: no match, no risk
    assert not refuse(index, "Just put butter on", window=8, threshold=0.0)  # shorter than a window


# -- the CBD loss -------------------------------------------------------------------------------------------------

# chosen ρ_w = −3 − (−4) = 1, rejected ρ_l = −6 − (−5) = −1: βΔ = 0.2, L_DPO = −ln σ(0.2) = 0.5981389
POLICY = [[[-1.0, -1.0, -1.0]], [[-2.0, -2.0, -2.0]]]
REFERENCE = [[[-1.5, -1.5, -1.0]], [[-2.0, -2.0, -1.0]]]


def argmax_head(texts):
    """A policy head whose argmax at each sequence's three scored positions spells ``texts[k]``."""
    tokenizer = build_tokenizer()
    logits = torch.zeros(2, 1, 3, len(tokenizer), dtype=torch.float64)
    for k, text in enumerate(texts):
        for t, ch in enumerate(text):
            logits[k, 0, t, tokenizer.convert_tokens_to_ids(ch)] = 5.0
    return logits_head(logits), tokenizer


def test_card_worked_example_released_cbd_loss(card_index):
    head, tokenizer = argmax_head(["d d", "b c"])  # rejected decodes to "b c": BCI 11.512925 > τ = 10, one match
    method = TraceAlign(index=card_index, penalty="released", threshold=10.0, lambda_penalty=0.01, window_size=2)
    method.tokenizer = tokenizer
    ctx = make_context(POLICY, REFERENCE, head=head)
    out = method.loss(ctx)
    assert out.metrics["tracealign/dpo_loss"].item() == pytest.approx(0.5981389, abs=1e-7)
    assert out.metrics["tracealign/penalty"] == pytest.approx(0.01 * 1.5129255, abs=1e-9)
    assert out.loss.item() == pytest.approx(0.6132681, abs=1e-7)
    assert released_penalty(load_index(card_index), "b c d d b c", window=2) == pytest.approx(2 * 1.5129255, abs=1e-6)
    # zero gradient: the released CBD loss trains exactly as DPO
    dpo_ctx = make_context(POLICY, REFERENCE)
    out.loss.backward()
    DPO(beta=0.1).loss(dpo_ctx).loss.backward()
    assert torch.equal(ctx.token_logps.grad, dpo_ctx.token_logps.grad)
    with pytest.raises(RuntimeError, match="scored_logits"):
        method.loss(make_context(POLICY, REFERENCE))  # the released form reads the policy's logits
    assert method.needs.scored_logits and not TraceAlign().needs.scored_logits


def weighted_context(weights, **kwargs):
    """The worked pair with a ``bci_weight`` token column ``[K][B][T]`` as the trainer hands it (``-1`` padding)."""
    return make_context(POLICY, REFERENCE, tokens={"bci_weight": torch.tensor(weights, dtype=torch.float64)}, **kwargs)


@pytest.mark.parametrize("penalty", ["logp", "unlikelihood"])
def test_inferred_penalty_gradient_only_inside_high_bci_spans_and_pushes_them_down(penalty):
    weights = [[[0.0, 0.0, 0.0]], [[0.0, 2.0, 0.5]]]
    ctx, dpo_ctx = weighted_context(weights), make_context(POLICY, REFERENCE)
    out = TraceAlign(penalty=penalty, lambda_penalty=0.01).loss(ctx)
    dpo = DPO(beta=0.1).loss(dpo_ctx)
    lp = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    term = lp if penalty == "logp" else -torch.log1p(-lp.exp())
    assert out.loss.item() == pytest.approx(dpo.loss.item() + 0.01 * (2.0 * term[0] + 0.5 * term[1]).item(), abs=1e-12)
    out.loss.backward()
    dpo.loss.backward()
    extra = ctx.token_logps.grad - dpo_ctx.token_logps.grad
    slope = 1.0 if penalty == "logp" else math.exp(-2) / (1 - math.exp(-2))  # d/dlp of log p, of −log(1 − p)
    assert extra[1, 0].tolist() == pytest.approx([0.0, 0.01 * 2.0 * slope, 0.01 * 0.5 * slope], abs=1e-12)
    assert (extra[0] == 0).all() and (extra[1, 0, 0] == 0)  # nothing outside the spans, nothing on the chosen side
    assert (extra[1, 0, 1:] > 0).all()  # gradient descent lowers their log-probs
    assert out.metrics["tracealign/flagged_rejected"].item() == pytest.approx(2 / 3)


def test_reductions_to_dpo():
    dpo = DPO(beta=0.1).loss(make_context(POLICY, REFERENCE)).loss.item()
    heavy = [[[5.0, 5.0, 5.0]], [[3.0, 3.0, 3.0]]]
    assert TraceAlign(lambda_penalty=0.0).loss(weighted_context(heavy)).loss.item() == pytest.approx(dpo, abs=1e-12)
    assert TraceAlign().loss(weighted_context([[[0.0] * 3], [[0.0, -1.0, -1.0]]])).loss.item() == \
        pytest.approx(dpo, abs=1e-12)  # padding (−1) is no weight  # fmt: skip
    both = TraceAlign(penalize="both").loss(weighted_context(heavy)).loss.item()
    assert both == pytest.approx(dpo + 0.01 * (15 * -1.0 + 9 * -2.0), abs=1e-12)


# -- through the trainer ----------------------------------------------------------------------------------------------


def pref_rows():
    return [json.loads(line) for line in PREFS.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shipped_index, tmp_path_factory):
    """The same N = 4 pairs through two real trainers from the same initial weights, λ = 0.05 and λ = 0 (= DPO): one
    batch's loss before training, then 3 optimiser steps each, and each run's rejected-token log-probs before/after."""
    args = {"index": shipped_index, "window_size": 4, "threshold": 20.0}
    runs = {}
    for lam in (0.05, 0.0):
        trainer = tiny_trainer("tracealign", tmp_path_factory.mktemp(f"run{lam}"), {**args, "lambda_penalty": lam},
                               rows=pref_rows()[:N], max_steps=3, training={"per_device_train_batch_size": N})  # fmt: skip
        examples = [trainer.train_dataset[i] for i in range(N)]
        batch = trainer.data_collator([dict(e) for e in examples])
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch).item()
            before = trainer.frozen_token_logps(trainer.model, batch)  # [2B, T]: token t+1's log-prob at t
        trainer.train()
        with torch.no_grad():
            after = trainer.frozen_token_logps(trainer.model, batch)
        runs[lam] = SimpleNamespace(examples=examples, batch=batch, loss=loss, before=before, after=after,
                                    logs=training_logs(trainer))  # fmt: skip
    return runs


def test_trainer_hands_the_weights_to_the_loss_label_shifted(trained):
    run, dpo = trained[0.05], trained[0.0]
    batch = run.batch
    for b, e in enumerate(run.examples):  # the collated column: the prompt's zeros, the weights, −1 padding
        n, m = len(e["prompt_ids"]), len(e["rejected_ids"])
        row = batch["bci_weight"][N + b].tolist()
        assert row[:n] == [0.0] * n and row[n : n + m] == pytest.approx(e["rejected_bci"], abs=1e-6)
        assert all(v == -1 for v in row[n + m :])
    assert sum(sum(e["rejected_bci"]) > 0 for e in run.examples) >= 3
    # L = L_DPO + λ · mean_b Σ_t w_t log π(y_t): weights of token t+1 meet its log-prob (the label shift)
    weights = batch["bci_weight"][N:, 1:].clamp(min=0) * batch["completion_mask"][N:, 1:]
    expected = dpo.loss + 0.05 * (weights * run.before[N:]).sum(-1).mean().item()
    assert run.loss == pytest.approx(expected, abs=1e-5) and dpo.loss == pytest.approx(math.log(2), abs=1e-6)


def test_a_few_steps_raise_the_margin_and_push_high_bci_tokens_down(trained):
    logs = trained[0.05].logs
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.5
    assert logs[0]["tracealign/flagged_rejected"] > 0.5 and logs[0]["tracealign/penalty"] < 0
    drops = {}
    for lam, run in trained.items():
        batch = run.batch
        flagged = (batch["bci_weight"][N:, 1:] > 0) & batch["completion_mask"][N:, 1:].bool()
        drops[lam] = (run.after[N:] - run.before[N:])[flagged].mean().item()
    assert drops[0.05] < drops[0.0] - 0.1 < 0  # the penalty lowers the high-BCI spans' likelihood beyond DPO's


def test_released_form_through_the_trainer_is_dpo_plus_a_constant(shipped_index, tmp_path):
    """The real trainer's argmax decoding: a corpus made of the policy's own argmax texts (so their windows match)
    gives a positive released penalty, added to DPO's loss as a constant: the same gradients as λ = 0."""
    rows = pref_rows()[:4]
    trainer = tiny_trainer("tracealign", tmp_path / "r", {"index": shipped_index, "penalty": "released"}, rows=rows)
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(4)])
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["completion_mask"][:, 1:].bool()
    texts = [trainer.processing_class.decode(logits[i, :-1].argmax(-1)[mask[i]].tolist(), skip_special_tokens=True)
             for i in range(8)]  # fmt: skip
    index = tmp_path / "argmax.tracealign"
    SuffixIndex.build([(str(i), t) for i, t in enumerate(texts)]).save(index)
    expected = sum(released_penalty(load_index(index), t, window=2, threshold=5.0) for t in texts)
    assert expected > 10

    def loss_and_grads(**args):
        trainer.method = TraceAlign(index=str(index), window_size=2, threshold=5.0, **args)
        trainer.method.tokenizer = trainer.processing_class
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]

    released, grads = loss_and_grads(penalty="released", lambda_penalty=0.01)
    dpo, dpo_grads = loss_and_grads(penalty="released", lambda_penalty=0.0)
    assert released == pytest.approx(dpo + 0.01 * expected, abs=1e-5)
    assert len(grads) == len(dpo_grads) > 0
    assert all(torch.allclose(g, h, atol=1e-6, rtol=0) for g, h in zip(grads, dpo_grads))


def test_recipe_validates_and_runs_on_cpu(shipped_index, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/tracealign.yaml").read_text())
    assert recipe["method"] == "tracealign" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/tracealign.yaml", tmp_path, f"method_args.index={shipped_index}",
                               f"data.train.path={PREFS.relative_to(ROOT)}")  # fmt: skip
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"] if k != "index"} == \
        {k: v for k, v in recipe["method_args"].items() if k != "index"}  # fmt: skip
