"""IRPO: the card's worked example and variants, the mask leak of the official code (reproduced here), the n = 2
reduction to DPO, gradients, invariances; token columns through the real collator and trainer (pooled item scores =
a direct forward's item means, off-item tokens ignored, items cut by max_length masked); real steps; the recipe;
bad input before any model loads."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from trl_plus_irpo import (
    IRPO,
    IRPOCollator,
    ideal_rank,
    irpo_losses,
    item_logits,
    item_weights,
    tokenize_list,
)

from trl_plus import DPO, FieldCollation, TrlPlusError, train
from trl_plus.testing import (
    build_model,
    build_tokenizer,
    forbid_model_loading,
    make_context,
    perturb,
    run_recipe_on_cpu,
    tiny_trainer,
    training_logs,
)

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "recipes/data/irpo_sample.jsonl"

# The card's worked example: per-token log-probs of each item (policy, reference), relevance, rank.
EXAMPLE_1 = dict(
    policy=[[-2.0, -1.0], [-0.5, -0.7, -0.3], [-1.2], [-3.0, -1.0]],
    reference=[[-1.6, -1.2], [-0.9, -0.6, -0.6], [-1.0], [-2.2, -1.4]],
    relevance=[0, 2, 1, 0], rank=[3, 1, 2, 4],
)  # fmt: skip
EXAMPLE_2 = dict(
    policy=[[-0.8], [-1.1], [-0.6]], reference=[[-1.1], [-1.0], [-1.0]], relevance=[1, 0, 0], rank=[1, 2, 3]
)
R_1, R_2 = [-0.1, 0.2, -0.2, -0.2], [0.3, -0.1, 0.4]


def list_context(examples, separator=(-5.0, -4.0), with_rank=True, **kwargs):
    """A one-sequence-per-example :class:`LossContext` laid out as the collator lays a list out: item tokens,
    then a separator token (item id −1, log-probs ``separator`` for policy / reference) after each item."""
    policy, reference, ids = [], [], []
    for example in examples:
        p, r, k_ids = [], [], []
        for k, (tp, tr) in enumerate(zip(example["policy"], example["reference"])):
            p += [*tp, separator[0]]
            r += [*tr, separator[1]]
            k_ids += [k] * len(tp) + [-1]
        policy.append(p), reference.append(r), ids.append(k_ids)
    ctx = make_context([policy], [reference], **kwargs)
    item_ids = torch.full(ctx.mask.shape, -1, dtype=torch.long)
    for b, row in enumerate(ids):
        item_ids[0, b, : len(row)] = torch.tensor(row)
    width = max(len(e["relevance"]) for e in examples)
    batch = {"relevance": torch.zeros(len(examples), width), "relevance_mask": torch.zeros(len(examples), width).bool()}
    if with_rank:
        batch["rank"] = torch.zeros(len(examples), width, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["relevance"])
        batch["relevance"][b, :n] = torch.tensor(e["relevance"], dtype=torch.float32)
        batch["relevance_mask"][b, :n] = True
        if with_rank:
            batch["rank"][b, :n] = torch.tensor(e["rank"])
    ctx.tokens = {"item_ids": item_ids}
    ctx.batch = {**ctx.batch, **batch}
    return ctx


def reward_losses(r, relevance, rank, beta=1.0, scheme=0, **kwargs):
    """Per-example losses and r (with grad) of one example given item rewards directly (float64)."""
    r = torch.tensor([r], dtype=torch.float64, requires_grad=True)
    y, rank = torch.tensor([relevance], dtype=torch.float64), torch.tensor([rank])
    mask = torch.ones_like(y, dtype=torch.bool)
    return irpo_losses(r, item_weights(y, rank, scheme), mask, beta, **kwargs), r


def official_rdpo_loss(policy_logps, reference_logps, relevance_rank, beta, ablation=0):
    """The official ``rdpo_loss`` (trainers.py), abridged: item scores in dicts keyed by item string, the j = k
    exclusion by subtracting 100 from the diagonal BEFORE multiplying by β, a sum over the batch."""
    total = torch.tensor(0.0, dtype=torch.float64)
    for policy_sample, reference_sample, ranking_sample in zip(policy_logps, reference_logps, relevance_rank):
        movies = list(policy_sample.keys())
        r = torch.stack([policy_sample[m] - reference_sample[m] for m in movies])
        relevances = torch.tensor([item[0] for item in ranking_sample][: len(r)]).double()
        ranks = torch.tensor([item[1] for item in ranking_sample][: len(r)]).double()
        if ablation == 1:
            weights = 1.0 / torch.log2(1 + ranks)
        elif ablation == 2:
            weights = (2**relevances - 1) / ranks
        else:
            weights = (2**relevances - 1) / torch.log2(1 + ranks)
        diffs = (r.unsqueeze(0) - r.unsqueeze(1)) - torch.eye(r.shape[0], dtype=torch.float64) * 100
        log_sum_exp = torch.logsumexp(beta * diffs, dim=1) - np.log(diffs.shape[0] - 1)
        total = total + -(weights * F.logsigmoid(-log_sum_exp)).mean()
    return total


def official_inputs(*examples):
    """The card's examples as the official code holds them: item-mean log-probs keyed by item name."""
    def means(lists):
        return {name: torch.tensor(sum(t) / len(t), dtype=torch.float64) for name, t in zip("ABCD", lists)}

    return ([means(e["policy"]) for e in examples], [means(e["reference"]) for e in examples],
            [list(zip(e["relevance"], e["rank"])) for e in examples])  # fmt: skip


# -- the card's numbers ----------------------------------------------------------------------------------------


def test_card_worked_example():
    method = IRPO(beta=1.0)
    ctx = list_context([EXAMPLE_1])
    assert method.item_scores(ctx, ctx.token_logps)[0].tolist() == pytest.approx([-1.5, -0.5, -1.2, -2.0], abs=1e-12)
    assert method.item_scores(ctx, ctx.ref_token_logps)[0].tolist() == pytest.approx([-1.4, -0.7, -1.0, -1.8],
                                                                                     abs=1e-12)  # fmt: skip
    r = torch.tensor([R_1], dtype=torch.float64)
    weights = item_weights(torch.tensor([[0.0, 2, 1, 0]], dtype=torch.float64), torch.tensor([[3, 1, 2, 4]]), 0)
    assert weights[0].tolist() == pytest.approx([0, 3, 0.630930, 0], abs=1e-6)
    logits, _ = item_logits(r, torch.ones(1, 4, dtype=torch.bool), beta=1.0)
    assert logits[0].tolist() == pytest.approx([0.0518121, -0.365544, 0.181487, 0.181487], abs=1e-6)
    assert (weights * F.softplus(logits))[0].tolist() == pytest.approx([0, 1.58096, 0.497174, 0], abs=1e-5)

    one, two = method.loss(ctx).loss.item(), method.loss(list_context([EXAMPLE_2])).loss.item()
    assert one == pytest.approx(0.519533, abs=1e-6) and two == pytest.approx(0.211794, abs=1e-6)
    both = list_context([EXAMPLE_1, EXAMPLE_2])  # a batch with a padded 4th entry for the 3-item example
    assert method.loss(both).loss.item() == pytest.approx(0.365664, abs=1e-6)  # recommended: batch mean
    assert IRPO(batch_reduction="sum").loss(both).loss.item() == pytest.approx(0.731327, abs=1e-6)  # official sum
    assert IRPO().loss(both).loss.item() == pytest.approx((one + two) / 2, abs=1e-12)
    # at initialisation (policy == reference): ℓ = log 2 · mean_k w_k
    init = [dict(e, reference=e["policy"]) for e in (EXAMPLE_1, EXAMPLE_2)]
    assert method.loss(list_context(init[:1])).loss.item() == pytest.approx(0.629192, abs=1e-6)
    assert method.loss(list_context(init[1:])).loss.item() == pytest.approx(0.231049, abs=1e-6)
    assert method.loss(list_context(init[:1])).loss.item() == pytest.approx(math.log(2) * (3 + 1 / math.log2(3)) / 4,
                                                                           abs=1e-12)  # fmt: skip


@pytest.mark.parametrize("args, expected", [
    ({"item_reduction": "sum"}, (2.07813, 0.635383)),
    ({"normalize_negatives": False, "item_reduction": "sum"}, (4.33863, 1.02083)),
    ({"weight_scheme": 1}, (0.430807, 0.504139)),
    ({"weight_scheme": 2}, (0.493740, 0.211794)),
])  # fmt: skip
def test_card_variants(args, expected):
    method = IRPO(**args)
    got = [method.loss(list_context([e])).loss.item() for e in (EXAMPLE_1, EXAMPLE_2)]
    assert got == pytest.approx(list(expected), abs=1e-5)  # the card's 6 significant digits


def test_official_rdpo_loss_agrees_at_beta_1_and_leaks_through_its_diagonal_at_small_beta():
    policy, reference, relevance_rank = official_inputs(EXAMPLE_1, EXAMPLE_2)
    both = list_context([EXAMPLE_1, EXAMPLE_2])
    official = official_rdpo_loss(policy, reference, relevance_rank, beta=1.0).item()
    assert official == pytest.approx(0.731327, abs=1e-6)  # the official batch sum
    assert IRPO(batch_reduction="sum").loss(both).loss.item() == pytest.approx(official, abs=1e-12)
    for scheme in (1, 2):
        ours = IRPO(weight_scheme=scheme, batch_reduction="sum").loss(both).loss.item()
        official = official_rdpo_loss(policy, reference, relevance_rank, 1.0, scheme).item()
        assert ours == pytest.approx(official, abs=1e-12)
    # the code's −100 on the diagonal is multiplied by β: exp(−100β) leaks into the "others" sum for small β
    one = official_inputs(EXAMPLE_1)
    for beta, exact, code in ((0.1, 0.616904, 0.616911), (0.01, 0.627950, 0.682038)):
        ours = IRPO(beta=beta).loss(list_context([EXAMPLE_1])).loss.item()
        assert ours == pytest.approx(exact, abs=1e-6)
        assert official_rdpo_loss(*one, beta=beta).item() == pytest.approx(code, abs=1e-6)


def test_two_items_reduce_to_half_of_length_normalised_dpo():
    losses, _ = reward_losses([0.3, -0.2], [1, 0], [1, 2])
    assert losses.item() == pytest.approx(0.237038, abs=1e-6)
    assert losses.item() == pytest.approx(0.5 * F.softplus(torch.tensor(-0.5, dtype=torch.float64)).item(), abs=1e-12)
    # item_reduction: sum is exactly DPO on item-mean log-ratios (each item a one-token "sequence" of its mean)
    example = dict(policy=[[-1.0, -1.4], [-2.0]], reference=[[-1.5, -1.3], [-1.8]], relevance=[1, 0], rank=[1, 2])
    ours = IRPO(beta=0.5, item_reduction="sum").loss(list_context([example])).loss.item()
    dpo = DPO(beta=0.5).loss(make_context([[[-1.2]], [[-2.0]]], [[[-1.4]], [[-1.8]]])).loss.item()
    assert ours == pytest.approx(dpo, abs=1e-12)
    assert IRPO(beta=0.5).loss(list_context([example])).loss.item() == pytest.approx(dpo / 2, abs=1e-12)


# -- gradients and invariances ------------------------------------------------------------------------------------


def test_card_gradients_sum_to_zero_and_reach_item_tokens_only():
    losses, r = reward_losses(R_1, [0, 2, 1, 0], [3, 1, 2, 4])
    losses.sum().backward()
    assert r.grad[0].tolist() == pytest.approx([0.135766, -0.271545, 0.0129329, 0.122846], abs=1e-6)
    assert r.grad.sum().item() == pytest.approx(0.0, abs=1e-12)
    # item C is relevant (w > 0) yet pushed down: it is a negative of the higher-weighted B
    assert r.grad[0, 2] > 0 and r.grad[0, 0] > 0 and r.grad[0, 3] > 0 and r.grad[0, 1] < 0
    losses, r = reward_losses(R_2, [1, 0, 0], [1, 2, 3])
    losses.sum().backward()
    assert r.grad[0].tolist() == pytest.approx([-0.156756, 0.0591817, 0.0975741], abs=1e-6)  # one relevant: pulled up
    assert r.grad.sum().item() == pytest.approx(0.0, abs=1e-12)
    # through the token log-probs: ∂ℓ/∂ℓ_t = (∂ℓ/∂r_k) / |T_k| on item k's tokens, 0 on separators
    ctx = list_context([EXAMPLE_1])
    IRPO().loss(ctx).loss.backward()
    grad = ctx.token_logps.grad[0, 0]
    expected = [0.135766 / 2] * 2 + [0] + [-0.271545 / 3] * 3 + [0] + [0.0129329] + [0] + [0.122846 / 2] * 2 + [0]
    assert grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_shift_permutation_and_irrelevant_lists():
    base = reward_losses(R_1, [0, 2, 1, 0], [3, 1, 2, 4])[0].item()
    assert reward_losses([v + 0.7 for v in R_1], [0, 2, 1, 0], [3, 1, 2, 4])[0].item() == pytest.approx(base, abs=1e-12)
    order = [2, 0, 3, 1]
    relevance, rank = [0, 2, 1, 0], [3, 1, 2, 4]
    permuted = reward_losses([R_1[i] for i in order], [relevance[i] for i in order], [rank[i] for i in order])
    assert permuted[0].item() == pytest.approx(base, abs=1e-12)
    # ... and through the token layout: the items written in another order, with their labels
    shuffled = {key: [EXAMPLE_1[key][i] for i in order] for key in ("policy", "reference", "relevance", "rank")}
    assert IRPO().loss(list_context([shuffled])).loss.item() == pytest.approx(base, abs=1e-12)
    # scheme 0: relevance-0 items never get a pull-up term; a list without relevant items costs nothing
    losses, r = reward_losses(R_1, [0, 0, 0, 0], [1, 2, 3, 4])
    losses.sum().backward()
    assert losses.item() == 0.0 and r.grad.abs().max().item() == 0.0


def test_rank_is_derived_from_relevance_when_absent():
    relevance = torch.tensor([[0.0, 2, 1, 0, 1], [1.0, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    assert ideal_rank(relevance, mask).tolist() == [[4, 1, 2, 5, 3], [1, 2, 3, 4, 5]]  # ties by input order
    for example in (EXAMPLE_1, EXAMPLE_2):  # the card's ranks are the ideal ones
        without = IRPO().loss(list_context([example], with_rank=False)).loss.item()
        assert without == pytest.approx(IRPO().loss(list_context([example])).loss.item(), abs=1e-12)


def test_segment_pooling_ignores_off_item_tokens_and_is_a_mean():
    method = IRPO()
    base = method.loss(list_context([EXAMPLE_1, EXAMPLE_2])).loss.item()
    moved = method.loss(list_context([EXAMPLE_1, EXAMPLE_2], separator=(3.0, -30.0))).loss.item()
    assert moved == pytest.approx(base, abs=1e-12)  # separator log-probs (item id −1) do not count
    doubled = {**EXAMPLE_1, "policy": [t * 2 for t in EXAMPLE_1["policy"]],
               "reference": [t * 2 for t in EXAMPLE_1["reference"]]}  # fmt: skip
    assert method.loss(list_context([doubled])).loss.item() == pytest.approx(0.519533, abs=1e-6)
    # sum pooling is a different score
    assert IRPO(item_pooling="sum").loss(list_context([EXAMPLE_1])).loss.item() != pytest.approx(0.519533, abs=1e-3)


def test_an_item_without_scored_tokens_is_masked_out():
    ctx = list_context([EXAMPLE_1])
    ctx.mask[0, 0, 7:] = 0  # as max_length would: C's and D's tokens are cut (A , B B B , | C , D D ,)
    ctx.token_logps.data[0, 0, 7:] = 0
    ctx.ref_token_logps[0, 0, 7:] = 0
    cut = IRPO().loss(ctx)
    short = {key: EXAMPLE_1[key][:2] for key in ("policy", "reference", "relevance", "rank")}
    assert cut.loss.item() == pytest.approx(IRPO().loss(list_context([short])).loss.item(), abs=1e-12)
    assert cut.metrics["irpo/items_cut"].item() == pytest.approx(0.5)


# -- the real tokenization, collator and trainer -------------------------------------------------------------


def sample_rows():
    return [json.loads(line) for line in SAMPLE.read_text().splitlines()]


def test_tokenize_writes_items_separators_and_item_ids():
    tokenizer = build_tokenizer()
    row = {"prompt": "Rank: ", "items": ["Up", "Big Fish", "Jaws"]}
    out = tokenize_list(row, tokenizer)
    assert tokenizer.decode(out["prompt_ids"]) == "Rank: "
    assert tokenizer.decode(out["completion_ids"]) == "Up,Big Fish,Jaws</s>"
    assert out["item_ids"] == [0, 0, -1] + [1] * 8 + [-1] + [2] * 4 + [-1]
    chat = tokenize_list({**row, "prompt": [{"role": "user", "content": "Rank: "}]}, tokenizer)
    assert tokenizer.decode(chat["prompt_ids"]) == "<|user|>Rank: </s><|assistant|>"
    assert chat["item_ids"] == out["item_ids"]
    two = tokenize_list(row, tokenizer, separator=" ;", max_prompt_length=3)  # not one token: tokenized
    assert tokenizer.decode(two["completion_ids"]) == "Up ;Big Fish ;Jaws</s>" and len(two["prompt_ids"]) == 3
    assert two["item_ids"][:4] == [0, 0, -1, -1]


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """A trainer on the sample whose policy left the reference (precomputed once from the initial tiny model), and
    one of its batches with the LossContext the method saw."""
    trainer = tiny_trainer("irpo", tmp_path_factory.mktemp("irpo"), rows=sample_rows(), reference_mode="precomputed")
    assert "ref_token_logps" in trainer.train_dataset.column_names and trainer.ref_model is None
    perturb(trainer.model)
    trainer.model.eval()
    seen = []
    loss = trainer.method.loss
    trainer.method.loss = lambda ctx: seen.append(ctx) or loss(ctx)
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(4)])
    with torch.no_grad():
        value = trainer.compute_loss(trainer.model, batch).item()
    trainer.method.loss = loss
    return trainer, batch, seen[0], value


def direct_item_means(model, batch):
    """``[B, n]`` each item's mean log-prob from a plain forward of ``model`` (full logits, causal shift)."""
    with torch.no_grad():
        logps = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logps = logps.log_softmax(-1)
    ids, items = batch["input_ids"], batch["item_ids"]
    out = torch.zeros(batch["relevance"].shape, dtype=torch.float64)
    for b in range(ids.size(0)):
        for k in range(out.size(1)):
            positions = (items[b] == k).nonzero().squeeze(1)
            out[b, k] = logps[b, positions - 1, ids[b, positions]].double().mean()  # token t predicted at t − 1
    return out


def test_pooled_item_scores_equal_a_direct_forward(perturbed):
    trainer, batch, ctx, _ = perturbed
    assert ctx.tokens["item_ids"].shape == ctx.token_logps.shape == (1, 4, batch["input_ids"].size(1) - 1)
    policy = trainer.method.item_scores(ctx, ctx.token_logps).double()
    reference = trainer.method.item_scores(ctx, ctx.ref_token_logps).double()
    assert torch.allclose(policy, direct_item_means(trainer.model, batch), atol=1e-6, rtol=0)
    initial = build_model(trainer.processing_class)  # seeded: the weights the reference was computed with
    assert torch.allclose(reference, direct_item_means(initial, batch), atol=1e-6, rtol=0)
    assert (policy - reference).abs().min() > 1e-3  # the perturbed policy's item rewards are not 0


def test_off_item_log_probs_leave_item_scores_and_the_loss_unchanged(perturbed):
    trainer, _, ctx, value = perturbed
    off = (ctx.tokens["item_ids"] == -1) & ctx.mask.bool()
    assert off.sum() == 4 * 5  # 4 separators and the EOS of each of the 4 lists (the prompt is not scored)
    noisy = copy.copy(ctx)
    noise = torch.randn(ctx.token_logps.shape, generator=torch.Generator().manual_seed(0))
    noisy.token_logps = ctx.token_logps + off * noise
    scores = trainer.method.item_scores
    assert torch.equal(scores(noisy, noisy.token_logps), scores(ctx, ctx.token_logps))
    assert trainer.method.loss(noisy).loss.item() == pytest.approx(value, abs=1e-6)
    on = copy.copy(ctx)
    on.token_logps = ctx.token_logps - 0.5 * (ctx.tokens["item_ids"] == 1)  # item 1's tokens: its score moves
    assert trainer.method.loss(on).loss.item() != pytest.approx(value, abs=1e-4)


def test_items_cut_by_max_length_are_masked(perturbed):
    trainer, _, _, _ = perturbed
    tokenizer, method = trainer.processing_class, trainer.method
    row = sample_rows()[0]  # ["Jaws", "Finding Nemo", "Up", "Heat", "Cars"]
    full = method.tokenize(row, tokenizer)
    length = len(full["prompt_ids"]) + len("Jaws") + 1 + len("Finding Nemo")  # ends on Finding Nemo's last token
    cut = FieldCollation(IRPOCollator(tokenizer.pad_token_id, length), method.needs)([{**row, **full}])
    short_row = {**row, **{key: row[key][:2] for key in ("items", "relevance", "rank")}}
    short = trainer.data_collator([{**short_row, **method.tokenize(short_row, tokenizer)}])
    seen = []
    loss = method.loss
    method.loss = lambda ctx: seen.append(loss(ctx)) or seen[-1]
    with torch.no_grad():
        cut_loss = trainer.compute_loss(trainer.model, cut).item()
        short_loss = trainer.compute_loss(trainer.model, short).item()
    method.loss = loss
    assert cut["num_truncated"].item() == 1 and cut["input_ids"].size(1) == length
    assert seen[0].metrics["irpo/items"].item() == 2 and seen[0].metrics["irpo/items_cut"].item() == pytest.approx(0.6)
    assert cut_loss == pytest.approx(short_loss, abs=1e-6)  # items 3-5 gone from the list, n = 2
    assert cut_loss > 0.05


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = tiny_trainer("irpo", tmp_path_factory.mktemp("irpo-train"), rows=sample_rows()[:8], max_steps=5,
                           training={"per_device_train_batch_size": 8})  # fmt: skip
    trainer.train()
    return training_logs(trainer)


def test_a_few_steps_raise_the_margin_of_relevant_over_irrelevant_items(trained):
    first, last = trained[0], trained[-1]
    # policy == reference at the first step: r = 0, L = 0, ℓ = log 2 · mean_k w_k over the batch (the 8 rows)
    per_row = [sum((2**y - 1) / math.log2(1 + k) for y, k in zip(r["relevance"], r["rank"])) / len(r["items"])
               for r in sample_rows()[:8]]  # fmt: skip
    assert first["loss"] == pytest.approx(math.log(2) * sum(per_row) / len(per_row), abs=1e-6)
    assert first["irpo/margin"] == 0.0 and first["irpo/items"] == 5 and first["irpo/items_cut"] == 0
    assert last["irpo/margin"] > first["irpo/margin"] + 0.4  # 0 -> 0.62
    assert last["irpo/reward_relevant"] > last["irpo/reward_irrelevant"]
    assert last["loss"] < first["loss"] and last["irpo/ndcg"] > first["irpo/ndcg"]


# -- the recipe, config and bad input --------------------------------------------------------------------------


def test_recipe_validates_and_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/irpo.yaml").read_text())
    assert recipe["method"] == "irpo" and recipe["model"]["quantization"]["load_in_4bit"]
    result = run_recipe_on_cpu("recipes/irpo.yaml", tmp_path, f"data.train.path={SAMPLE}")
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "trl_plus_recipe.yaml").read_text())["method_args"]
    assert {k: resolved[k] for k in recipe["method_args"]} == recipe["method_args"]


def test_config_rejects_bad_values():
    for bad in ({"weight_scheme": 3}, {"beta": 0}, {"item_reduction": "max"}, {"ablation": 1}):
        with pytest.raises(ValidationError):
            IRPO(**bad)


def _edit(rows, row, **changes):
    return [dict(r, **changes) if i == row else r for i, r in enumerate(rows)]


BAD = [
    ("relevance of the wrong length", lambda rows: _edit(rows, 1, relevance=[1, 0, 0]),
     r"row 2: column 'relevance' has 3 values but 'items' has 5"),
    ("relevance of the wrong type", lambda rows: _edit(rows, 2, relevance=["high", "low", 0, 0, 0]),
     r"row 3: column 'relevance' must be a list of numbers"),
    ("negative relevance", lambda rows: _edit(rows, 0, relevance=[0, 2, -1, 0, 1]),
     r"row 1: column 'relevance' has -1: relevance labels are numbers ≥ 0"),
    ("duplicate items", lambda rows: _edit(rows, 3, items=["Heat", "Bambi", "Heat", "Tangled", "The Italian Job"]),
     r"row 4: column 'items' lists 'Heat' twice \(entries 0 and 2\): remove the duplicate"),
    ("one item", lambda rows: _edit(rows, 0, items=["Up"], relevance=[1], rank=[1]),
     r"row 1: column 'items' has 1 item\(s\).*at least 2"),
    ("rank in some rows only", lambda rows: rows[:4] + [{k: v for k, v in rows[4].items() if k != "rank"}] + rows[5:],
     r"row 5: column 'rank' is missing while other rows have it"),
    ("rank 0", lambda rows: _edit(rows, 0, rank=[0, 1, 2, 3, 4]), r"row 1: column 'rank' has 0: ranks are positions"),
]  # fmt: skip


@pytest.mark.parametrize("make, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_lists_are_one_line_errors_before_any_model_loads(make, message, tmp_path, monkeypatch):

    forbid_model_loading(monkeypatch)
    data = tmp_path / "lists.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make(sample_rows())))
    recipe = {"method": "irpo", "model": {"name_or_path": "tiny-llama"}, "data": {"train": {"path": str(data)}},
              "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1}}  # fmt: skip
    (tmp_path / "irpo.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrlPlusError, match=message) as error:
        train(tmp_path / "irpo.yaml")
    assert "\n" not in str(error.value) and "lists.jsonl" in str(error.value)
