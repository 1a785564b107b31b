"""SAIL: the released loss is TGDPO's (the card's worked example, α = 0 ≡ DPO, log 2 at init); the inferred
attention-score weights (off by default); `trl-plus sail localize` on the tiny model (spans, drift, the override it
prints and writes, errors, --help); the layer-targeted LoRA recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trl_plus_sail import (
    PROBES,
    SAIL,
    layer_ranges,
    load_for_attention,
    load_probes,
    localize,
    render,
    system_attention,
)

from trl_plus import DPO, FrozenOutputs, TrlPlusError, load_recipe
from trl_plus.testing import cli, make_context

ROOT = Path(__file__).resolve().parents[3]

# The TGDPO card's worked example (the SAIL card reuses it), β = 0.1.
POLICY = [[[-1.0, -2.0, -0.5], [-0.7, -1.1]], [[-1.5, -2.5], [-2.1, -0.3, -1.0]]]
REFERENCE = [[[-1.2, -1.8, -0.9], [-0.6, -1.3]], [[-1.4, -2.0], [-1.8, -0.4, -1.2]]]
GUIDE = [[[-0.8, -2.1, -0.4], [-0.5, -1.0]], [[-1.9, -2.2], [-2.4, -0.2, -1.5]]]


def guided(**kwargs):
    logps = make_context(GUIDE, requires_grad=False).token_logps
    return make_context(POLICY, REFERENCE, frozen={"guide": FrozenOutputs(logps=logps)}, **kwargs)


def scored(chosen, rejected):
    """A card context whose batch carries focal-score columns as the collator builds them (padded + mask)."""
    def column(lists):
        width = max(len(v) for v in lists)
        values = torch.tensor([v + [0.0] * (width - len(v)) for v in lists])
        return values, torch.tensor([[True] * len(v) + [False] * (width - len(v)) for v in lists])

    (c, cm), (r, rm) = column(chosen), column(rejected)
    batch = {"chosen_focal_scores": c, "chosen_focal_scores_mask": cm,
             "rejected_focal_scores": r, "rejected_focal_scores_mask": rm}  # fmt: skip
    return make_context(POLICY, REFERENCE, batch=batch)


def test_the_released_loss_is_tgdpo_with_sail_alpha_half():
    assert SAIL().config.alpha == 0.5 and SAIL().config.token_scores == "guide"
    assert SAIL().loss(guided()).loss.item() == pytest.approx(0.6654604, abs=5e-8)
    dpo = DPO(beta=0.1).loss(make_context(POLICY, REFERENCE)).loss.item()
    assert dpo == pytest.approx(0.6662782, abs=5e-8)
    assert SAIL(alpha=0.0).loss(guided()).loss.item() == pytest.approx(dpo, abs=1e-15)
    at_init = make_context(REFERENCE, REFERENCE, frozen=guided().frozen)
    assert SAIL().loss(at_init).loss.item() == pytest.approx(math.log(2), abs=1e-15)


def test_attention_scores_are_the_same_weights_from_columns():
    # the card's r̂ as columns: token_scores="attention" with a_t = r̂_t gives the code's loss exactly
    _, reward = SAIL().token_weights(guided())
    mask = guided().mask.bool()
    chosen = [reward[0, b][mask[0, b]].tolist() for b in range(2)]
    rejected = [reward[1, b][mask[1, b]].tolist() for b in range(2)]
    ctx = scored(chosen, rejected)
    ours = SAIL(token_scores="attention").loss(ctx).loss.item()
    assert ours == pytest.approx(0.6654604, abs=5e-8)
    # zero scores (an empty system span) are DPO; longer lists (cut with the sequence) are read up to the response
    dpo = DPO(beta=0.1).loss(make_context(POLICY, REFERENCE)).loss.item()
    zero = scored([[0.0] * 5, [0.0] * 5], [[0.0] * 5, [0.0] * 5])
    assert SAIL(token_scores="attention").loss(zero).loss.item() == pytest.approx(dpo, abs=1e-15)
    # the weights carry no gradient; the attention mode needs no guidance model
    ctx.batch["chosen_focal_scores"].requires_grad_(True)
    SAIL(token_scores="attention").loss(ctx).loss.backward()
    assert ctx.batch["chosen_focal_scores"].grad is None
    assert SAIL(token_scores="attention").needs.teachers == {} and SAIL.needs.teachers == {"guide": "logps"}


def test_attention_scores_errors():
    with pytest.raises(TrlPlusError, match="chosen_focal_scores.*sail score|token_scores=guide"):
        SAIL(token_scores="attention").loss(make_context(POLICY, REFERENCE))
    short = scored([[0.1, 0.2], [0.1, 0.2]], [[0.0, 0.0], [0.0, 0.0, 0.0]])  # chosen pair 1 has 3 tokens
    with pytest.raises(TrlPlusError, match="chosen_focal_scores: example 0 of the batch has 2 scores for 3"):
        SAIL(token_scores="attention").loss(short)
    with pytest.raises(ValidationError):
        SAIL(token_scores="heads")
    with pytest.raises(ValidationError):
        SAIL(sail_alpha=0.5)


@pytest.mark.parametrize("layers, text", [([19, 20, 21, 22, 23, 24, 25], "19-25"), ([3], "3"),
                                          ([19, 20, 21, 22, 23, 25], "19-23,25"), ([5, 1, 2], "1-2,5")])  # fmt: skip
def test_layer_ranges_round_trip_through_the_recipe_parser(layers, text):
    assert layer_ranges(layers) == text
    recipe = load_recipe(ROOT / "recipes/sail.yaml", [f"model.lora.layers={text}"])
    assert recipe.model.lora.layers == sorted(set(layers))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_for_attention(tiny_model_dir, device="cpu")


def test_render_finds_the_system_and_response_spans(tiny):
    _, tokenizer = tiny
    ids, system, response = render(tokenizer, "Always answer in French.", "Hi there?", "Bonjour.")
    assert tokenizer.decode([ids[i] for i in system]) == "Always answer in French."
    assert tokenizer.decode([ids[i] for i in response]) == "Bonjour."
    assert system.stop <= response.start


def test_system_attention_is_a_mass_in_0_1_and_lift_is_relative_to_uniform(tiny):
    model, tokenizer = tiny
    ids, system, response = render(tokenizer, "Answer with one word only.", "Colour of the sky?", "Blue.")
    mass = system_attention(model, ids, system, response)
    assert mass.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert bool(((mass > 0) & (mass < 1)).all())
    # by hand for layer 0: the queries predicting the response tokens, their mass on the system keys
    with torch.no_grad():
        att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions[0][0]
    queries = list(range(response.start - 1, response.stop - 1))
    by_hand = att[:, queries][:, :, system.start:system.stop].sum(-1).mean(-1)
    assert torch.allclose(mass[0], by_hand, atol=1e-6)
    lift = system_attention(model, ids, system, response, measure="lift")
    share = torch.tensor([len(system) / (q + 1) for q in queries])
    assert torch.allclose(lift[0], (att[:, queries][:, :, system.start:system.stop].sum(-1) / share).mean(-1),
                          atol=1e-5)  # fmt: skip


def test_localize_returns_layers_inside_the_model(tiny):
    model, tokenizer = tiny
    num_layers = model.config.num_hidden_layers
    result = localize(model, tokenizer, load_probes(None)[:3], top_k=3)
    assert result["layers"] and all(0 <= layer < num_layers for layer in result["layers"])
    assert result["layers"] == sorted({layer for layer, _, _ in result["heads"]}) and len(result["heads"]) == 3
    drift = result["drift"]
    assert drift.shape == (num_layers, model.config.num_attention_heads) and bool((drift >= 0).all())
    assert [v for _, _, v in result["heads"]] == sorted(drift.flatten().tolist(), reverse=True)[:3]
    one = localize(model, tokenizer, load_probes(None)[:1], top_k=1)
    assert len(one["layers"]) == 1 and one["heads"][0][2] == pytest.approx(float(one["drift"].max()))
    # no conflict (the same turn twice): no drift anywhere
    same = [dict(p, conflict=p["user"]) for p in PROBES[:1]]
    assert float(localize(model, tokenizer, same, top_k=2)["drift"].abs().max()) == 0.0


def test_localize_command_prints_and_writes_the_override(tiny_model_dir, tmp_path, capsys):
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in PROBES[:3]))
    out = tmp_path / "sail-focal.yaml"
    code = cli("sail", "localize", "--model", tiny_model_dir, "--probes", str(probes), "--top-k", "2",
               "--device", "cpu", "--recipe", str(ROOT / "recipes/sail.yaml"), "--output", str(out))  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("--set model.lora.layers="))
    ranges = line.split("=", 1)[1]
    recipe = load_recipe(out)  # the recipe copy with the focal layers
    assert recipe.model.lora.layers and all(0 <= layer < 2 for layer in recipe.model.lora.layers)
    assert layer_ranges(recipe.model.lora.layers) == ranges and "3 probes" in printed
    original = yaml.safe_load((ROOT / "recipes/sail.yaml").read_text())
    assert yaml.safe_load(out.read_text())["method_args"] == original["method_args"]
    override = tmp_path / "override.yaml"
    assert cli("sail", "localize", "--model", tiny_model_dir, "--probes", str(probes), "--top-k", "1",
               "--measure", "lift", "--output", str(override)) == 0  # fmt: skip
    assert set(yaml.safe_load(override.read_text())) == {"model"}


def test_localize_is_listed_in_help(capsys):
    with pytest.raises(SystemExit):
        cli("--help")
    assert "sail" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli("sail", "--help")
    group = capsys.readouterr().out
    assert "localize" in group and "attention drift" in group


def test_localize_errors(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"system": "x", "user": "y", "response": "z"}) + "\n")
    with pytest.raises(TrlPlusError, match=r"bad.jsonl:1: .*'conflict' is missing"):
        load_probes(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(TrlPlusError, match=r"bad.jsonl:1: not JSON"):
        load_probes(str(bad))
    assert cli("sail", "localize", "--model", tiny_model_dir, "--top-k", "0") == 2
    assert cli("sail", "localize", "--model", str(tmp_path / "nowhere")) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == "error: --top-k 0: keep at least one head" and errors[1].startswith("error: --model ")


def test_recipe_trains_lora_on_the_focal_layers_only(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from trl_plus.testing import run_recipe_on_cpu

    monkeypatch.chdir(ROOT)
    recipe = yaml.safe_load((ROOT / "recipes/sail.yaml").read_text())
    lora = recipe["model"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (8, 16, 0.0)
    assert lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and recipe["method_args"]["alpha"] == 0.5
    result = run_recipe_on_cpu("recipes/sail.yaml", tmp_path, "model.lora.layers=1",
                               "teachers.guide={name_or_path: tiny-llama}")  # fmt: skip
    assert result.global_step == 2
    weights = load_file(tmp_path / "adapter_model.safetensors")
    modules = {key.split(".lora_")[0] for key in weights}
    assert len(modules) == 1 * 4 and all(".layers.1." in m for m in modules)  # |layers| x |targets|
    assert {m.rsplit(".", 1)[-1] for m in modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def conflict_rows(n=8):
    """Conversational pairs with a system rule (the chosen reply follows it)."""
    rows = []
    for i in range(n):
        prompt = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": f"Count to {i}."}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Un, deux ... {i}."}],
                     "rejected": [{"role": "assistant", "content": f"One, two ... {i}!"}]})  # fmt: skip
    return rows


def test_score_writes_aligned_columns_that_train_in_attention_mode(tiny_model_dir, tmp_path, capsys):
    from trl_plus.testing import perturb, tiny_trainer, write_jsonl

    data, scored_file = write_jsonl(conflict_rows(4), tmp_path / "pairs.jsonl"), tmp_path / "scored.jsonl"
    assert cli("sail", "score", "--model", tiny_model_dir, "--data", data, "--output", str(scored_file),
               "--heads", "0.1,1.2", "--device", "cpu") == 0  # fmt: skip
    rows = [json.loads(line) for line in scored_file.read_text().splitlines()]
    for row in rows:
        values = row["chosen_focal_scores"] + row["rejected_focal_scores"]
        assert all(-1 <= v <= 1 for v in values) and any(abs(v) > 0.1 for v in values)
    trainer = tiny_trainer("sail", tmp_path / "run", {"token_scores": "attention", "alpha": 1.0}, rows=rows)
    perturb(trainer.model)
    trainer.model.eval()
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(4)])
    counts = batch["chosen_focal_scores_mask"].sum(-1)
    scored_tokens = batch["completion_mask"][:4].sum(-1)  # one score per scored chosen token (turn end included)
    assert counts.tolist() == scored_tokens.tolist()
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch).item()
        trainer.method = SAIL(token_scores="attention", alpha=0.0)  # the same trainer and weights: DPO
        base = trainer.compute_loss(trainer.model, batch).item()
    assert math.isfinite(ours) and abs(ours - base) > 1e-6  # the scores reach the loss
    assert cli("sail", "score", "--model", tiny_model_dir, "--data", data, "--output", str(scored_file),
               "--heads", "5.0") == 2  # fmt: skip
    assert "5.0 is outside the model (2 layers x 4 heads)" in capsys.readouterr().err
