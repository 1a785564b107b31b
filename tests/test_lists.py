"""Listwise data in the core: one field-collation path, variable K per example, ragged list columns, token-aligned
columns with segment pooling, and their bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from conftest import first_batch, perturb
from trl_plus import (
    DPO,
    ListField,
    LossContext,
    LossOutput,
    Method,
    Needs,
    Paper,
    Sequence,
    TrlPlusError,
)
from trl_plus.data.collate import (
    SEQ_MASK,
    SEQUENCE_SLOTS,
    FieldCollation,
    SequencesCollator,
    prompt_completion,
)
from trl_plus.data.load import check_lists
from trl_plus.testing import preference_rows, tiny_trainer

PAPER = Paper("A test method", "0000.00000")


# -- K = 2 through the general path equals the pairwise path ----------------------------------------------------


class SequencesDPO(DPO):
    """DPO whose pairs go through SequencesCollator + FieldCollation instead of TRL's pairwise collator."""

    name = "test-sequences-dpo"

    def collator(self, pad_token_id, max_length, truncation_mode="keep_start"):
        def sequences(example):
            return [prompt_completion(example["prompt_ids"], example[f"{side}_ids"]) for side in ("chosen", "rejected")]

        return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode)


def loss_and_grads(trainer):
    perturb(trainer.model, seed=3)  # the policy leaves the reference: a loss away from log 2, real gradients
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, first_batch(trainer, 6))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_dpo_through_the_general_collation_path_equals_the_pairwise_path(tmp_path):
    pairwise = loss_and_grads(tiny_trainer("dpo", tmp_path / "a"))
    general = loss_and_grads(tiny_trainer(SequencesDPO, tmp_path / "b"))
    assert abs(pairwise[0] - math.log(2)) > 1e-3
    assert general[0] == pytest.approx(pairwise[0], abs=1e-6)
    assert general[1].keys() == pairwise[1].keys() and len(general[1]) > 0
    for name, grad in pairwise[1].items():
        torch.testing.assert_close(general[1][name], grad, atol=1e-6, rtol=0, msg=name)


# -- variable K -------------------------------------------------------------------------------------------------


def list_rows():
    """Four prompts with 2, 4, 3 and 1 completions (the first is the best)."""
    pairs = preference_rows(8)
    counts = [2, 4, 3, 1]
    return [{"prompt": pairs[i]["prompt"],
             "completions": [pairs[i]["chosen"]] + [pairs[(i + j) % 8]["rejected"] for j in range(1, n)],
             "scores": [float(n - j) for j in range(n)]}
            for i, n in enumerate(counts)]  # fmt: skip


def tokenize_list(example, tokenizer):
    from trl_plus import tokenize_completions

    out = tokenize_completions(tokenizer, example["prompt"], {str(k): c for k, c in enumerate(example["completions"])})
    return {"prompt_ids": out["prompt_ids"], "completion_ids": [out[str(k)] for k in range(len(example["completions"]))]}


class Listwise(Method):
    """A listwise test loss: per example, −log softmax_k of the log-ratios at the best completion (k = 0), masked
    to the example's real completions; summed over examples (so a batch's loss is the sum of its examples')."""

    name = "test-listwise"
    paper = PAPER
    needs = Needs(reference="yes", list_fields=(ListField("completions", dtype="text"),
                                                ListField("scores", same_length_as="completions")))  # fmt: skip
    data_fields = ("prompt",)
    sequences_per_example = None
    tokenize = staticmethod(tokenize_list)
    tokenized_columns = ("prompt_ids", "completion_ids")
    seen: list = []

    def collator(self, pad_token_id, max_length, truncation_mode="keep_start"):
        def sequences(example):
            return [prompt_completion(example["prompt_ids"], ids) for ids in example["completion_ids"]]

        return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode)

    def loss(self, ctx: LossContext) -> LossOutput:
        ratios = (ctx.logps() - ctx.ref_logps()).masked_fill(ctx.sequence_mask == 0, -math.inf)
        per_example = -torch.log_softmax(ratios, dim=0)[0]
        type(self).seen.append((ctx, per_example.detach()))
        return LossOutput(per_example.sum())


def listwise_trainer(tmp_path, **kwargs):
    return tiny_trainer(Listwise, tmp_path, rows=list_rows(), **kwargs)


def test_the_collator_forwards_only_real_sequences_and_places_them_in_the_grid():
    examples = [{"ids": [[1, 2], [1, 3, 4]]}, {"ids": [[5], [5, 6], [5, 7], [5, 8, 9]]}]
    collate = SequencesCollator(lambda e: [(ids, [0] + [1] * (len(ids) - 1)) for ids in e["ids"]], 0, None)
    batch = collate(examples)
    assert batch["input_ids"].shape[0] == 6  # 2 + 4 rows, never 4 x 2
    assert batch[SEQ_MASK].tolist() == [[True, True], [True, True], [False, True], [False, True]]
    assert batch[SEQUENCE_SLOTS].tolist() == [0, 1, 2, 3, 5, 7]  # k * B + b
    assert batch["input_ids"][4].tolist() == [5, 7, 0]


def test_an_example_gets_the_same_loss_in_a_mixed_batch_as_alone(tmp_path):
    trainer = listwise_trainer(tmp_path)
    perturb(trainer.model, seed=1)
    rows = [trainer.train_dataset[i] for i in range(4)]
    rows_seen = {"policy": [], "reference": []}
    hooks = [model.register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
             for model, seen in ((trainer.model, rows_seen["policy"]), (trainer.ref_model, rows_seen["reference"]))]
    with torch.no_grad():
        mixed = trainer.compute_loss(trainer.model, trainer.data_collator([dict(r) for r in rows]))
        alone = [trainer.compute_loss(trainer.model, trainer.data_collator([dict(r)])) for r in rows]
    for hook in hooks:
        hook.remove()
    # each forward runs on exactly Σ K_b rows: 2 + 4 + 3 + 1 for the batch of four, never 4 x 4
    assert rows_seen == {"policy": [10, 2, 4, 3, 1], "reference": [10, 2, 4, 3, 1]}
    assert mixed.item() == pytest.approx(sum(a.item() for a in alone), abs=1e-6)
    assert [a.item() for a in alone][-1] == 0.0  # one completion: softmax over itself
    ctx, per_example = Listwise.seen[0]
    assert ctx.token_logps.shape[:2] == (4, 4) and ctx.seq_mask.tolist()[3] == [0.0, 1.0, 0.0, 0.0]
    assert ctx.token_logps[3, 0].abs().sum() == 0 and ctx.mask[3, 0].sum() == 0  # a missing slot is all zeros
    assert torch.allclose(per_example, torch.stack([a for a in alone]), atol=1e-6)


def test_variable_k_with_precomputed_reference_equals_the_live_reference(tmp_path):
    live = listwise_trainer(tmp_path / "live")
    pre = listwise_trainer(tmp_path / "pre", reference_mode="precomputed")
    for trainer in (live, pre):
        perturb(trainer.model, seed=2)
    with torch.no_grad():
        a = live.compute_loss(live.model, first_batch(live, 4))
        b = pre.compute_loss(pre.model, first_batch(pre, 4))
    assert abs(a.item() - sum(math.log(n) for n in (2, 4, 3, 1))) > 1e-4  # the policy left the reference
    assert b.item() == pytest.approx(a.item(), abs=1e-6)


def test_list_columns_are_padded_with_a_mask_and_kept_through_column_pruning(tmp_path):
    trainer = listwise_trainer(tmp_path)
    batch = first_batch(trainer, 2)
    assert batch["scores"].tolist() == [[2.0, 1.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0]]
    assert batch["scores_mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert "completions" not in batch  # text lists are for tokenization, not collated
    batch = next(iter(trainer.get_train_dataloader()))  # TRL prunes the columns the method does not name
    assert torch.equal(batch["scores_mask"].T, batch[SEQ_MASK])  # one score per completion, slot for slot


def test_a_training_step_runs_on_variable_k(tmp_path):
    trainer = listwise_trainer(tmp_path, max_steps=2, training={"per_device_train_batch_size": 4})
    trainer.train()
    assert len([e for e in trainer.state.log_history if "loss" in e]) == 2


# -- bad list columns -------------------------------------------------------------------------------------------


def bad_scores(change):
    """list_rows() with the scores changed: one row's (an int key) or every row's (a function of the row)."""
    rows = list_rows()
    if callable(change):
        return [{**r, "scores": change(r)} for r in rows]
    rows[1]["scores"] = change
    return rows


@pytest.mark.parametrize(("rows", "message"), [
    (bad_scores([1.0]), r"row 2: column 'scores' has 1 values but 'completions' has 4: give one per entry"),
    (bad_scores(lambda r: ["high"] * len(r["scores"])), r"row 1: column 'scores' must be a list of numbers, not \["),
    (bad_scores(lambda r: 3.0), r"row 1: column 'scores' must be a list of numbers, not 3.0"),
    (bad_scores(lambda r: [True] * len(r["scores"])), r"row 1: column 'scores' must be a list of numbers"),
], ids=["length", "strings", "scalar", "booleans"])  # fmt: skip
def test_a_list_column_of_the_wrong_length_or_type_names_the_row_and_column(rows, message):
    with pytest.raises(TrlPlusError, match=r"^r.yaml: data.train \(lists.jsonl\): " + message):
        check_lists(Dataset.from_list(rows), Listwise, "r.yaml: data.train (lists.jsonl)")


def test_the_trainer_checks_list_columns_of_a_raw_dataset(tmp_path):
    rows = list_rows()
    rows[2]["scores"] = rows[2]["scores"][:1]
    with pytest.raises(TrlPlusError, match=r"train dataset: row 3: column 'scores' has 1 values but 'completions' has 3"):
        tiny_trainer(Listwise, tmp_path, rows=rows)


def test_describe_names_the_list_columns():
    assert Listwise.needs.describe() == "reference, lists completions, scores"
    assert Listwise.required_columns() == ("prompt", "completions", "scores")


# -- token columns and pooling ----------------------------------------------------------------------------------

ITEMS = [["red", "green", "blue"], ["one", "two"], ["alpha", "beta", "gamma", "delta"]]


def tokenize_items(example, tokenizer):
    """prompt, then item_1 "," item_2 ... "," item_n EOS with per-token item ids (-1 off-item)."""
    prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    sep = tokenizer(",", add_special_tokens=False)["input_ids"]
    ids, items = [], []
    for k, item in enumerate(example["items"]):
        if k:
            ids, items = ids + sep, items + [-1] * len(sep)
        tokens = tokenizer(item, add_special_tokens=False)["input_ids"]
        ids, items = ids + tokens, items + [k] * len(tokens)
    ids, items = ids + [tokenizer.eos_token_id], items + [-1]
    return {"prompt_ids": prompt, "completion_ids": ids, "item_ids": items}


class ItemScores(Method):
    """Pools per-token log-probs into item scores (the loss is their sum; the context is kept for the test)."""

    name = "test-items"
    paper = PAPER
    needs = Needs(reference="no", token_fields=("item_ids",), list_fields=(ListField("items", dtype="text"),))
    data_fields = ("prompt",)
    sequences_per_example = 1
    tokenize = staticmethod(tokenize_items)
    tokenized_columns = ("prompt_ids", "completion_ids", "item_ids")
    seen: list = []

    def collator(self, pad_token_id, max_length, truncation_mode="keep_start"):
        def sequences(example):
            ids, scored = prompt_completion(example["prompt_ids"], example["completion_ids"])
            return [Sequence(ids, scored, {"item_ids": [-1] * len(example["prompt_ids"]) + example["item_ids"]})]

        return SequencesCollator(sequences, pad_token_id, max_length, truncation_mode)

    def loss(self, ctx: LossContext) -> LossOutput:
        scores = ctx.pool(ctx.token_logps, ctx.tokens["item_ids"], 4)
        type(self).seen.append(ctx)
        return LossOutput(-scores.sum())


def item_trainer(tmp_path, **training):
    rows = [{"prompt": f"List {len(items)} words:", "items": items} for items in ITEMS]
    return tiny_trainer(ItemScores, tmp_path, rows=rows, training=training or None)


def direct_item_means(model, example):
    """Each item's mean next-token log-prob, from a plain forward of prompt + completion."""
    ids = torch.tensor([example["prompt_ids"] + example["completion_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    items = torch.tensor([-1] * len(example["prompt_ids"]) + example["item_ids"])[1:]
    return [logps[items == k].mean().item() for k in range(len(example["items"]))]


def test_pooled_item_scores_equal_each_items_mean_log_prob_from_a_direct_forward(tmp_path):
    trainer = item_trainer(tmp_path)
    perturb(trainer.model, seed=4)
    ItemScores.seen = []
    with torch.no_grad():
        trainer.compute_loss(trainer.model, first_batch(trainer, 3))
    ctx = ItemScores.seen[-1]
    pooled = ctx.pool(ctx.token_logps, ctx.tokens["item_ids"], 4)[0]  # [B, S]
    for b in range(3):
        expected = direct_item_means(trainer.model, trainer.train_dataset[b])
        assert pooled[b, : len(expected)].tolist() == pytest.approx(expected, abs=1e-6)
        assert pooled[b, len(expected):].abs().sum() == 0  # no such item
    mask = ctx.segment_mask(ctx.tokens["item_ids"], 4)[0]
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False], [True] * 4]

    # log-probs off the items (prompt, separators, EOS, padding) never reach an item score
    off_item = ctx.tokens["item_ids"] < 0
    noisy = ctx.token_logps.masked_fill(off_item, 0.0) + torch.randn(ctx.token_logps.shape) * off_item
    assert torch.equal(ctx.pool(noisy, ctx.tokens["item_ids"], 4), ctx.pool(ctx.token_logps, ctx.tokens["item_ids"], 4))
    sums = ctx.pool(ctx.token_logps, ctx.tokens["item_ids"], 4, reduce="sum")[0]
    counts = torch.tensor([[len(trainer._tokenizer(w, add_special_tokens=False)["input_ids"]) for w in items] +
                           [0] * (4 - len(items)) for items in ITEMS], dtype=torch.float32)  # fmt: skip
    torch.testing.assert_close(sums, pooled * counts, atol=1e-6, rtol=1e-6)  # float32 sums of ~20


def test_an_item_cut_by_max_length_is_masked(tmp_path):
    example_length = len(item_trainer(tmp_path / "full").train_dataset[2]["prompt_ids"]) + len("alpha,beta,gam")
    trainer = item_trainer(tmp_path / "cut", max_length=example_length)  # "delta" and most of "gamma" are cut
    ItemScores.seen = []
    with torch.no_grad():
        trainer.compute_loss(trainer.model, first_batch(trainer, 3))
    ctx = ItemScores.seen[-1]
    assert ctx.tokens["item_ids"].shape == ctx.token_logps.shape
    assert ctx.segment_mask(ctx.tokens["item_ids"], 4)[0, 2].tolist() == [True, True, True, False]
    full = item_trainer(tmp_path / "again")
    with torch.no_grad():
        full.compute_loss(full.model, first_batch(full, 3))
    whole = ItemScores.seen[-1]
    kept = ctx.pool(ctx.token_logps, ctx.tokens["item_ids"], 4)[0, 2, :2]
    assert kept.tolist() == pytest.approx(whole.pool(whole.token_logps, whole.tokens["item_ids"], 4)[0, 2, :2].tolist(),
                                          abs=1e-6)  # items before the cut keep their scores  # fmt: skip


def test_field_collation_keeps_the_wrapped_collators_attributes():
    inner = SequencesCollator(lambda e: [], 0, 8, side_names=("completion",))
    wrapped = FieldCollation(inner, Needs())
    assert wrapped.side_names == ("completion",) and wrapped.max_length == 8 and wrapped.sequences is inner.sequences
