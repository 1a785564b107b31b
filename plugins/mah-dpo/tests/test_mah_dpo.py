"""MAH-DPO: the card's batch and ensemble examples, objective-balanced averaging, and through the real trainer: one
head without noise ≡ DPO, a head without pairs gets no gradient, balanced batches, save → reload gives the same
logits per head, generation mixes the heads; the shipped recipe; one-line errors before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig
from trl_plus_mah_dpo import HEADS, MAHDPO, BalancedSampler, mix_head_logits

from trl_plus import TrlPlusError, generate, load_recipe, load_run, train, trained_module
from trl_plus.testing import (
    forbid_model_loading,
    make_context,
    preference_rows,
    run_recipe_on_cpu,
    tiny_trainer,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "recipes/data/mah_dpo_sample.jsonl"

# The card's pairs (β = 0.1; sums): ℓθ(y_w), ℓθ(y_l), ℓref(y_w), ℓref(y_l) and each pair's objective.
PAIRS = [(-10, -12, -11, -11.5), (-8, -9, -8.5, -8.2), (-15, -14, -15.5, -13)]
OBJECTIVES = [0, 0, 1]


def card_context(pairs=PAIRS, objectives=OBJECTIVES):
    policy = [[[p[0]] for p in pairs], [[p[1]] for p in pairs]]
    reference = [[[p[2]] for p in pairs], [[p[3]] for p in pairs]]
    return make_context(policy, reference, batch={"objective": torch.tensor(objectives)})


def test_card_batch_example_is_the_mean_over_objectives():
    out = MAHDPO(beta=0.1).loss(card_context())
    assert out.loss.item() == pytest.approx(0.6232823, abs=1e-7)
    assert out.metrics["mah/loss_objective_0"].item() == pytest.approx(0.6256076, abs=1e-7)
    assert out.metrics["mah/loss_objective_1"].item() == pytest.approx(0.6209570, abs=1e-7)
    per_example = sum(math.log1p(math.exp(-0.1 * ((a - c) - (b - d)))) for a, b, c, d in PAIRS) / 3
    assert per_example == pytest.approx(0.6240574, abs=1e-7) and abs(out.loss.item() - per_example) > 5e-4
    # duplicating every pair of one objective changes nothing: objectives weigh the same, not examples
    twice = card_context(PAIRS + PAIRS[2:], OBJECTIVES + [1])
    assert MAHDPO(beta=0.1).loss(twice).loss.item() == pytest.approx(out.loss.item(), abs=1e-12)
    # one objective: DPO's mean; equal policy and reference: log 2
    assert MAHDPO(beta=0.1).loss(card_context(PAIRS[:2], [1, 1])).loss.item() == pytest.approx(0.6256076, abs=1e-7)
    same = [(p[2], p[3], p[2], p[3]) for p in PAIRS]
    assert MAHDPO().loss(card_context(same)).loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_card_ensemble_example():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.5, 1.0]], dtype=torch.float64)
    mixed = mix_head_logits(logits, [1, 3])
    assert mixed.tolist() == pytest.approx([0.5, 1.375, 0.75], abs=1e-12)
    assert mixed.softmax(-1).tolist() == pytest.approx([0.2135429, 0.5122627, 0.2741945], abs=1e-7)
    assert torch.equal(mix_head_logits(logits, [3, 9]), mixed)  # scale-invariant
    assert torch.equal(mix_head_logits(logits, [0, 1]), logits[1])  # one-hot = that head
    assert mix_head_logits(logits).tolist() == pytest.approx([1.0, 1.25, 0.5])  # uniform by default
    with pytest.raises(TrlPlusError, match="give 2 non-negative weights"):
        mix_head_logits(logits, [1, -1])


def test_every_balanced_batch_holds_b_over_n_of_each_objective():
    objectives = [0] * 10 + [1] * 6 + [2] * 9
    sampler = BalancedSampler(objectives, batch_size=6, generator=torch.Generator().manual_seed(0))
    order = list(sampler)
    assert len(order) == len(sampler) == 18  # the smallest objective (6) in shares of 2: 3 batches
    assert len(set(order)) == len(order)
    for b in range(0, len(order), 6):
        assert sorted(objectives[i] for i in order[b : b + 6]) == [0, 0, 1, 1, 2, 2]
    assert list(sampler) != order  # a new draw each epoch
    with pytest.raises(TrlPlusError, match="multiple of 3"):
        BalancedSampler(objectives, batch_size=4, generator=torch.Generator())


# -- the real trainer -----------------------------------------------------------------------------------------------


def rows_with(objectives):
    return [dict(r, objective=o) for r, o in zip(preference_rows(len(objectives)), objectives)]


def lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      init_lora_weights=False)  # random B: the policy leaves the reference


def batch_of(trainer, n=8):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def lora_grads(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def test_one_head_without_noise_is_dpo_through_the_trainer(tmp_path):
    rows = rows_with([0] * 8)
    torch.manual_seed(0)
    dpo = tiny_trainer("dpo", tmp_path / "dpo", {"beta": 0.1}, rows=preference_rows(8), peft_config=lora())
    torch.manual_seed(0)
    mah = tiny_trainer("mah-dpo", tmp_path / "mah", {"beta": 0.1, "num_heads": 1, "head_noise": 0.0}, rows=rows,
                       peft_config=lora())  # fmt: skip
    theirs, ours = lora_grads(dpo), lora_grads(mah)
    assert theirs.keys() == ours.keys()
    batch = batch_of(mah)
    losses = [t.compute_loss(t.model, dict(batch)) for t in (dpo, mah)]
    assert abs(losses[0].item() - math.log(2)) > 1e-3
    assert losses[1].item() == pytest.approx(losses[0].item(), abs=1e-6)
    for loss in losses:
        loss.backward()
    theirs, ours = lora_grads(dpo), lora_grads(mah)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6, rtol=0), name


def test_a_head_gets_no_gradient_without_pairs_of_its_objective(tmp_path):
    mah = tiny_trainer("mah-dpo", tmp_path, {"num_heads": 3}, rows=rows_with([0, 2] * 4), peft_config=lora())
    model = mah.accelerator.unwrap_model(mah.model)
    mah.compute_loss(mah.model, batch_of(mah)).backward()
    grad = trained_module(model, HEADS).weight.grad.view(3, -1, 64)
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert not grad[1].any()  # exactly zero: no pair of objective 1 in the batch
    assert all(g is not None and g.abs().sum() > 0 for n, g in lora_grads(mah).items() if "lora_B" in n)


def test_the_trainer_draws_balanced_batches(tmp_path):
    mah = tiny_trainer("mah-dpo", tmp_path, {"num_heads": 2}, rows=rows_with([0] * 12 + [1] * 6), peft_config=lora(),
                       training={"per_device_train_batch_size": 4})  # fmt: skip
    batches = list(mah.get_train_dataloader())
    assert len(batches) == 3  # 6 pairs of objective 1, 2 per batch
    assert all(sorted(b["objective"].tolist()) == [0, 0, 1, 1] for b in batches)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A LoRA run of 2 steps on the tiny model, saved as `trl-plus train` saves it, and its trainer."""
    out = tmp_path_factory.mktemp("mah-run")
    args = {"beta": 0.1, "num_heads": 2, "head_noise": 0.001}
    trainer = tiny_trainer("mah-dpo", out, args, rows=rows_with([0, 1] * 8), max_steps=2, learning_rate=5e-2,
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    trainer.train()
    trainer.save_model()
    recipe = {"method": "mah-dpo", "method_args": args, "model": {"name_or_path": "tiny-llama",
              "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
              "data": {"train": {"path": "pairs.jsonl"}}}  # fmt: skip
    (out / "trl_plus_recipe.yaml").write_text(yaml.safe_dump(recipe))
    return out, trainer


def head_logits(method, model, ids):
    """``[N, L, V]`` the logits of each head alone (one-hot mixing weights)."""
    out = []
    for k in range(method.config.num_heads):
        weights = [1.0 if j == k else 0.0 for j in range(method.config.num_heads)]
        with torch.no_grad():
            out.append(method.generation_model(model, weights)(input_ids=ids).logits[0])
    return torch.stack(out)


def test_save_and_reload_give_the_same_logits_per_head(trained_run):
    out, trainer = trained_run
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    heads = trained_module(policy, HEADS).weight.detach().clone()
    loaded, tokenizer, method = load_run(out)
    assert torch.equal(trained_module(loaded, HEADS).weight, heads)  # the trained heads, not prepare_model's
    ids = tokenizer("Add 2 and 3.", return_tensors="pt")["input_ids"]
    ours, reloaded = head_logits(method, policy, ids), head_logits(method, loaded, ids)
    assert torch.allclose(ours, reloaded, atol=1e-6)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two heads trained apart
    mixed = method.generation_model(loaded, [1, 3])(input_ids=ids).logits[0].detach()
    assert torch.allclose(mixed, 0.25 * reloaded[0] + 0.75 * reloaded[1], atol=1e-5)  # the ensemble: logits
    texts = generate(out, ["Add 2 and 3."], weights=[0.7, 0.3], max_new_tokens=4)
    assert len(texts) == 1 and isinstance(texts[0], str)


# -- the shipped recipe and sample, bad input ------------------------------------------------------------------------


def test_recipe_validates_and_runs_on_the_sample_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert {r["objective"] for r in rows} == {0, 1}
    result = run_recipe_on_cpu("recipes/mah-dpo.yaml", tmp_path, f"data.train.path={SAMPLE}")
    assert result.global_step == 2 and (tmp_path / "adapter_model.safetensors").exists()
    assert "mah/loss_objective_0" in result.metrics


@pytest.mark.parametrize("objective, message", [
    (2, "row 3: objective 2 is not one of the declared heads 0..1 (method_args.num_heads: 2)"),
    (-1, "row 3: objective -1 is not one of the declared heads"),
])  # fmt: skip
def test_an_objective_outside_the_heads_is_one_line_before_any_model_loads(tmp_path, monkeypatch, objective, message):
    forbid_model_loading(monkeypatch)
    data = write_jsonl(rows_with([0, 1, objective, 0]), tmp_path / "pairs.jsonl")
    recipe = tmp_path / "mah.yaml"
    recipe.write_text(yaml.safe_dump({"method": "mah-dpo", "method_args": {"num_heads": 2},
                                      "model": {"name_or_path": "tiny-llama"}, "data": {"train": {"path": data}},
                                      "training": {"output_dir": str(tmp_path / "run")}}))  # fmt: skip
    with pytest.raises(TrlPlusError) as error:
        train(recipe)
    assert message in str(error.value) and "\n" not in str(error.value) and str(recipe) in str(error.value)
    assert load_recipe(recipe).method == "mah-dpo"


def test_a_full_fine_tuning_run_reloads_its_heads(tmp_path):
    args = {"num_heads": 2}
    trainer = tiny_trainer("mah-dpo", tmp_path, args, rows=rows_with([0, 1] * 4), max_steps=1, learning_rate=5e-2)
    assert trainer.ref_model is not None and not hasattr(trainer.ref_model, HEADS)  # copied before the heads
    trainer.train()
    trainer.save_model()
    (tmp_path / "trl_plus_recipe.yaml").write_text(yaml.safe_dump({
        "method": "mah-dpo", "method_args": args, "model": {"name_or_path": "tiny-llama"},
        "data": {"train": {"path": "pairs.jsonl"}}}))  # fmt: skip
    loaded, _, _ = load_run(tmp_path)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    assert torch.equal(loaded.get_submodule(HEADS).weight, trained.get_submodule(HEADS).weight)
    assert torch.equal(loaded.get_output_embeddings().weight, trained.get_output_embeddings().weight)
