"""SPRO: pair selection (the card's rewards), the filter order pinned, the stage-1 DPO worked example and log 2 at
init, the diffusion stage never calls a reference, and a tiny end-to-end data stage whose rows `trl-plus train`'s
checks accept for both stages (candidates listed, and written by a tiny LM)."""

from __future__ import annotations

import json
import math

import pytest
from trl_plus_spro import pick_rows, select_pair, spro_data

from trl_plus import DiffusionTrainer, TrlPlusError, get_method, load_recipe
from trl_plus.testing import checked_split, cli, diffusion_rows, make_context, tiny_diffusion_trainer, tiny_trainer


def test_card_pair_selection():
    assert select_pair([6.9, 7.4, 6.2, 7.1]) == (1, 2)
    assert select_pair([6.9, 7.4, 6.2, 7.1], keep=[True, False, True, True]) == (3, 2)  # filtered, then selected
    assert select_pair([5.0, 5.0, 5.0]) is None and select_pair([5.0, 6.0], keep=[True, False]) is None
    assert select_pair([7.0, 7.0, 6.0]) == (0, 2)  # ties: the earlier candidate


def test_filter_order_is_pinned():
    rewards = [[6.9, 7.4, 6.2, 7.1], [6.0, 6.5, 6.1, 6.2]]
    # base mean 7.0: caption 0 keeps its pair (7.4 > 7.0), caption 1 drops it (6.5 ≤ 7.0)
    pairs, kept = pick_rows(["a", "b"], [["p0", "p1", "p2", "p3"], ["q0", "q1", "q2", "q3"]], rewards, [7.2, 6.8])
    assert kept == [0] and (pairs[0]["chosen"], pairs[0]["rejected"]) == ("p1", "p2")
    # the similarity filter runs before selection and the base-mean filter after it: without p1, the winner is p3
    # (7.1 > 7.0, kept); with a base mean of 7.15 the same pair is dropped (no fallback to another winner)
    keep = [[True, False, True, True], [True] * 4]
    pairs, kept = pick_rows(["a", "b"], [["p0", "p1", "p2", "p3"], ["q0", "q1", "q2", "q3"]], rewards, [7.2, 6.8], keep)
    assert kept == [0] and (pairs[0]["chosen"], pairs[0]["rejected"]) == ("p3", "p2")
    assert pick_rows(["a"], [["p0", "p1", "p2", "p3"]], rewards[:1], [7.15], keep[:1]) == ([], [])
    with pytest.raises(TrlPlusError, match="base_rewards"):
        pick_rows(["a"], [["x", "y"]], [[1.0, 2.0]], [])


def test_stage_one_dpo_worked_example():
    dpo = get_method("dpo")(beta=0.1)
    ctx = make_context([[[-50.0]], [[-55.0]]], [[[-52.0]], [[-54.0]]])  # z = 0.1·(2 − (−1)) = 0.3
    assert dpo.loss(ctx).loss.item() == pytest.approx(0.554355, abs=1e-6)
    same = make_context([[[-50.0]], [[-55.0]]], [[[-50.0]], [[-55.0]]])
    assert dpo.loss(same).loss.item() == pytest.approx(math.log(2), abs=1e-12)  # policy == reference


def test_the_diffusion_stage_never_calls_a_reference(tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("diffusion-sft asked for a reference")

    monkeypatch.setattr(DiffusionTrainer, "reference_errors", no_reference)
    monkeypatch.setattr(DiffusionTrainer, "reference_denoiser", no_reference)
    rows = [{"prompt": r["prompt"], "x0": r["x0"][:1]} for r in diffusion_rows(4)]
    trainer = tiny_diffusion_trainer("diffusion-sft", tmp_path, rows=rows, max_steps=2)
    assert trainer.reference_mode == "none" and trainer.ref_model is None
    trainer.train()
    assert trainer.state.global_step == 2


SEEDS = [{"caption": "a red circle", "candidates": ["a red circle, bright", "a red circle, dark night",
                                                     "a red circle on white paper"]},
         {"caption": "a blue square", "candidates": ["a blue square, glowing", "a blue square in fog"]}]


def accepted(tmp_path, done, stage_one_overrides=()):
    prompt = load_recipe("recipes/spro-prompt.yaml", [
        "model.name_or_path=tiny-llama", "model.lora=null", "model.dtype=float32", f"data.train.path={done.pairs_path}",
        f"training.output_dir={tmp_path / 'p'}", *stage_one_overrides])  # fmt: skip
    image = load_recipe("recipes/spro-image.yaml", [
        "model.name_or_path=tiny-sd", "model.dtype=float32", "model.text_encoders.dtype=float32",
        "model.resolution=16", f"data.train.path={done.sft_path}", f"training.output_dir={tmp_path / 'i'}"])
    return len(checked_split(prompt)), len(checked_split(image))


def test_data_stage_end_to_end(tmp_path):
    done = spro_data("tiny-sd", SEEDS, tmp_path / "data", [("brightness", 1.0)], steps=2, images=2, resolution=16,
                     dtype="float32")  # fmt: skip
    table = [json.loads(x) for x in (tmp_path / "data" / "candidates.jsonl").read_text().splitlines()]
    assert len(table) == 5
    for pair in done.pairs:  # the best and worst of its caption's candidates, above the base captions' mean
        rewards = {r["prompt"]: r["reward"] for r in table if r["caption"] == pair["caption"]}
        assert pair["chosen_reward"] == max(rewards.values()) > done.base_mean
        assert pair["rejected_reward"] == min(rewards.values())
    print("pairs kept:", len(done.pairs), "base mean:", done.base_mean, [r["reward"] for r in table])
    assert done.pairs and len(done.sft) == 2 * len(done.pairs)
    assert all((tmp_path / "data" / r["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for r in done.sft)
    assert accepted(tmp_path, done) == (len(done.pairs), len(done.sft))


def test_tiny_lm_writer_and_the_command(tmp_path, one_thread):
    from trl_plus_spro import lm_writer

    lm = tiny_trainer("sft", tmp_path / "lm", rows=[{"prompt": "a", "completion": "b"}] * 2)
    writer = lm_writer(lm.model, lm.processing_class, max_new_tokens=12, seed=0)
    assert writer("a caption:", 2) == lm_writer(lm.model, lm.processing_class, max_new_tokens=12, seed=0)("a caption:", 2)
    done = spro_data("tiny-sd", [{"caption": "a red circle"}, {"caption": "a blue square"}], tmp_path / "w",
                     [("brightness", 1.0)], writer=writer, n=3, steps=2, resolution=16, dtype="float32")  # fmt: skip
    assert len(done.candidates) >= 4 and all(c["prompt"] for c in done.candidates)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    assert cli("spro", "data", str(seeds), "--model", "tiny-sd", "--out", str(tmp_path / "c"), "--scorer",
               "brightness", "--steps", "2", "--resolution", "16", "--dtype", "float32") == 0  # fmt: skip
    assert (tmp_path / "c" / "pairs.jsonl").is_file() and (tmp_path / "c" / "sft.jsonl").is_file()


def test_one_line_errors(tmp_path):
    with pytest.raises(TrlPlusError, match="seeds.0: 'candidates' must list at least two"):
        spro_data("tiny-sd", [{"caption": "x", "candidates": ["only one"]}], tmp_path, [("brightness", 1.0)])
    with pytest.raises(TrlPlusError, match="seeds.0: each seed row needs a non-empty 'caption'"):
        spro_data("tiny-sd", [{"candidates": ["a", "b"]}], tmp_path, [("brightness", 1.0)])
    with pytest.raises(TrlPlusError, match="give an image scorer"):
        spro_data("tiny-sd", SEEDS, tmp_path, [])
