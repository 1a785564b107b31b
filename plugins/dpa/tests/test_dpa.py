"""DPA: the card's direction encoding and worked selection, selection invariances, SFT rows (assistant tokens only),
the vector scorers, and an iterated recipe on the tiny model whose generation-side reward v·r̃ rises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from trl_plus_dpa import (
    DPA,
    MODEL_CARD_PROMPT,
    DPAConfig,
    ToyAttributes,
    direction,
    direction_prompt,
    direction_weights,
    preference_scores,
    select,
)

from trl_plus import SFT, Rollouts
from trl_plus.testing import build_tokenizer, iteration_firsts, make_context, write_jsonl

ROOT = Path(__file__).resolve().parents[3]

# Card worked example: candidates' (helpfulness, verbosity)
CANDIDATES = [[70, 80], [72, 40], [65, 20], [75, 90]]


def test_direction_encoding_of_the_card():
    assert direction_weights(-15) == (97, -26)
    assert direction_weights(0) == (100, 0)
    assert direction_weights(45) == (71, 71)
    v = direction(-15)
    assert v == pytest.approx((0.965926, -0.258819), abs=1e-6)
    assert math.hypot(*v) == pytest.approx(1.0, abs=1e-12)


def test_card_worked_example_selection():
    scores = preference_scores(CANDIDATES, direction(-15))
    assert scores.tolist() == pytest.approx([46.9093, 59.1939, 57.6088, 49.1507], abs=1e-4)
    assert select(CANDIDATES, direction(-15)) == 1  # y2
    assert select(CANDIDATES, direction(0)) == 3  # y4: θ = 0 is argmax helpfulness


def test_selection_is_invariant_to_shifts_and_positive_scaling_of_v():
    rewards = torch.tensor(CANDIDATES, dtype=torch.float64)
    for theta in (-45, -15, 0, 20, 45):
        v = torch.tensor(direction(theta), dtype=torch.float64)
        best = select(rewards, v)
        assert select(rewards + torch.tensor([13.0, -7.0], dtype=torch.float64), v) == best
        assert select(rewards, 3.5 * v) == best
    assert select(rewards, (1.0, 0.0)) == int(rewards[:, 0].argmax())  # v = (1, 0): argmax helpfulness
    assert select([[1.0, 0.0], [1.0, 5.0]], (1.0, 0.0)) == 0  # ties to the first
    assert select([[float("nan"), 0.0], [0.0, 0.0]], (1.0, 0.0)) == 1  # a NaN score never wins


def test_direction_prompt_text_and_chat():
    config = DPAConfig()
    system = MODEL_CARD_PROMPT.format(w_h=97, w_v=-26)
    assert system.endswith("weighted rating = helpfulness*97 + verbosity*-26")
    assert direction_prompt("Hi?", -15, config) == system + "\nHi?"
    chat = [{"role": "system", "content": "old"}, {"role": "user", "content": "Hi?"}]
    assert direction_prompt(chat, -15, config) == [{"role": "system", "content": system},
                                                   {"role": "user", "content": "Hi?"}]  # fmt: skip
    with pytest.raises(ValueError, match="min_angle 10.0 exceeds max_angle 0.0"):
        DPAConfig(min_angle=10, max_angle=0)


def card_rollouts(theta: float) -> Rollouts:
    """The card's four candidates of one prompt, plus a second prompt with two, as the rollout stage makes them."""
    n = len(CANDIDATES) + 2
    rewards = CANDIDATES + [[1, 1], [2, 0]]
    angles = [theta] * 4 + [90.0] * 2
    return Rollouts(
        prompt_ids=[[5, 6]] * 4 + [[7]] * 2, completion_ids=[[10 + i, 3] for i in range(n)],
        prompts=["p"] * 4 + ["q"] * 2, completions=[f"y{i + 1}" for i in range(n)],
        group=torch.tensor([0] * 4 + [1] * 2), source=["policy"] * n,
        scores=torch.tensor([[r[0], r[1], 0.0] for r in rewards], dtype=torch.float64),
        weights=torch.ones(3, dtype=torch.float64), eos=torch.ones(n, dtype=torch.bool),
        lengths=torch.full((n,), 2.0), score_names=("rm/helpfulness", "rm/verbosity", "digits"),
        columns={"angle": angles, "direction": [list(direction(a)) for a in angles]},
    )  # fmt: skip


def test_make_examples_keeps_the_argmax_of_v_dot_r_as_sft_rows():
    rows = DPA().make_examples(card_rollouts(-15))
    assert [r["completion_ids"] for r in rows] == [[11, 3], [14, 3]]  # y2 at −15°; at 90° the verbose one
    first = rows[0]
    assert first["prompt_ids"] == [5, 6] and first["weights"] == [97, -26] and first["rewards"] == [72, 40]
    assert first["score"] == pytest.approx(59.1939, abs=1e-4)
    assert first["messages"][-1] == {"role": "assistant", "content": "y2"}
    assert DPA().make_examples(card_rollouts(0))[0]["completion_ids"] == [13, 3]  # y4
    json.dumps(rows)  # rows.jsonl holds them as they are
    with pytest.raises(ValueError, match="objective 'length' matches 0"):
        DPA(objectives=("helpfulness", "length")).make_examples(card_rollouts(0))


def test_sft_rows_score_the_assistant_tokens_only():
    rows = DPA().make_examples(card_rollouts(-15))
    batch = DPA().collator(pad_token_id=0, max_length=None)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 11, 3], [7, 14, 3, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]  # direction prompt masked


def test_the_loss_is_sfts_token_mean_nll_and_its_gradient_lowers_the_nll():
    ctx = make_context([[[-1.0, -2.0, -3.0], [-0.5]]])
    ctx.token_logps.requires_grad_(True)
    out = DPA().loss(ctx)
    assert out.loss.item() == pytest.approx(6.5 / 4, abs=1e-12)
    assert out.loss.item() == pytest.approx(SFT().loss(ctx).loss.item(), abs=1e-12)
    out.loss.backward()
    grad = ctx.token_logps.grad[ctx.mask.bool()]
    assert torch.all(grad < 0)  # descent raises the log-prob of every selected token
    assert DPA.needs.reference == "no" and DPA.needs.rollout.when == "iteration" and DPA.needs.rollout.n == 8


def test_toy_attributes_and_the_multi_objective_reward_model(tmp_path):
    scores = ToyAttributes().score(["p", "p"], ["ab12", "3 x"])
    assert scores.tolist() == [[2.0, 2.0], [1.0, 1.0]]
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from trl_plus import get_registry

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    cls = get_registry().get_scorer("reward-model")  # the core's, with several labels
    rm = cls(model=str(tmp_path / "rm"), label=[2, 0], names=("helpfulness", "verbosity"))
    assert rm.outputs == ("helpfulness", "verbosity")
    out = rm.score(["Q1", "Q2"], ["a1", "b22"])
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    full = cls(model=str(tmp_path / "rm"), label=[0, 1, 2], names=("a", "b", "c")).score(["Q1", "Q2"], ["a1", "b22"])
    assert torch.allclose(out, full[:, [2, 0]])


def dpa_recipe(tmp_path: Path) -> str:
    recipe = yaml.safe_load((ROOT / "recipes" / "dpa-tiny.yaml").read_text())
    data = write_jsonl([{"prompt": f"Q{i}:"} for i in range(48)], tmp_path / "prompts.jsonl")
    recipe["data"] = {"train": {"path": data}}
    recipe["training"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "dpa.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_iterated_dpa_raises_the_generation_side_reward(tmp_path):
    from trl_plus import train

    result = train(dpa_recipe(tmp_path))
    run = Path(result.output_dir)
    firsts = iteration_firsts(run)
    rewards = [first["dpa/reward"] for first in firsts]  # mean v·r̃ of each iteration's samples
    helpfulness = [first["dpa/helpfulness"] for first in firsts]
    assert rewards[2] - rewards[0] > 1.5, rewards  # measured 1.74 -> 2.24 -> 4.95
    assert helpfulness[2] - helpfulness[0] > 2.0, helpfulness  # measured 1.30 -> 2.86 -> 5.65 (digits)
    assert all(f["dpa/selected"] >= f["dpa/reward"] for f in firsts)  # best-of-N beats the mean
    for t in (1, 2, 3):  # every SFT row is the argmax of v·r̃ among its prompt's samples
        rows = [json.loads(line) for line in (run / f"iter-{t}" / "rows.jsonl").read_text().splitlines()]
        assert len(rows) == 48
        for row in rows:
            assert -45 <= row["angle"] <= 45
            assert row["score"] == pytest.approx(sum(v * r for v, r in zip(row["direction"], row["rewards"])))
