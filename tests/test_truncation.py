"""``max_length`` never cuts silently: the trainer and ``trl-plus validate`` say what truncation removes, per side,
each step logs the fraction of its sequences that were cut, and data that truncation empties is one clear line.

The tiny model's tokenizer is character-level (one character = one token, EOS appended to text completions), so
every count below follows from the lengths of the strings.
"""

from __future__ import annotations

import logging

import pytest
import yaml

from trl_plus import TrlPlusError
from trl_plus.cli import main
from trl_plus.data.collate import PairwiseCollator, SequencesCollator, prompt_completion
from trl_plus.data.lengths import TruncationReport, truncation_report
from trl_plus.testing import tiny_trainer, training_logs, write_jsonl

# prompt 10 tokens, chosen 20 + EOS = 21, rejected 5 + EOS = 6: pairs of 31 and 16 tokens
LONG = {"prompt": "p" * 10, "chosen": "c" * 20, "rejected": "r" * 5}
SHORT = {"prompt": "q" * 4, "chosen": "yes", "rejected": "no"}


def test_the_report_counts_per_side_what_each_truncation_mode_removes():
    pair = {"prompt_ids": [1] * 10, "chosen_ids": [2] * 21, "rejected_ids": [3] * 6}
    collator = PairwiseCollator(pad_token_id=0, max_length=12)
    start = truncation_report(collator, [pair, pair], 12, "keep_start")
    assert start.sides == ("chosen", "rejected") and start.examples == 2
    assert start.cut_sequences == [2, 2]  # 31 and 16 tokens both exceed 12
    assert start.prompt_tokens_lost == [0, 0] and start.completion_tokens_lost == [38, 8]  # 19 and 4 tokens each
    end = truncation_report(collator, [pair], 12, "keep_end")  # keep_end cuts the front: the prompt first
    assert end.prompt_tokens_lost == [10, 4] and end.completion_tokens_lost == [9, 0]
    assert end.no_scored_token == 0
    empty = truncation_report(collator, [pair], 10, "keep_start")  # the prompt alone fills the window
    assert empty.no_scored_token == 1
    assert truncation_report(collator, [pair], None, "keep_start") is None


def test_sequence_collators_name_their_sides_and_say_what_they_cut():
    def sequences(example):
        return [prompt_completion(example["p"], example["c"])]

    collator = SequencesCollator(sequences, pad_token_id=0, max_length=4, side_names=("completion",))
    report = truncation_report(collator, [{"p": [1, 1], "c": [2, 2, 2]}, {"p": [1], "c": [2]}], 4, "keep_start")
    assert isinstance(report, TruncationReport) and report.any
    assert report.summary("data.train").startswith(
        "data.train: max_length 4 (keep_start) truncates completion: 1 of 2 sequences lose 0 prompt and 1 completion "
        "tokens. If that is not intended, raise training.max_length"
    )
    assert int(collator([{"p": [1, 1], "c": [2, 2, 2]}, {"p": [1], "c": [2]}])["num_truncated"]) == 1


def test_the_trainer_says_once_what_truncation_cuts_and_logs_the_fraction_per_step(tmp_path, caplog):
    rows = [LONG] * 8 + [SHORT] * 8  # batches of 8 pairs: 16 sequences, of which the LONG pairs' chosen are cut
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        trainer = tiny_trainer("dpo", tmp_path, rows=rows, max_steps=2, training={"max_length": 20})
    lines = [r.getMessage() for r in caplog.records if "truncates" in r.getMessage()]
    assert lines == [
        "train dataset: max_length 20 (keep_start) truncates chosen: 8 of 16 sequences lose 0 prompt and 88 "
        "completion tokens. If that is not intended, raise training.max_length, filter or shorten the data, or "
        "change training.truncation_mode"
    ]
    trainer.train()
    logged = [entry["truncated"] for entry in training_logs(trainer)]
    assert len(logged) == 2 and sum(logged) / 2 == pytest.approx(8 / 32)  # 8 of the 32 sequences of the 2 steps


def test_data_that_truncation_would_drop_entirely_is_one_line_not_a_sampler_traceback(tmp_path, caplog):
    with pytest.raises(TrlPlusError, match=r"^train dataset: 16 of 16 examples are dropped before training: their "
                                           r"prompt alone fills max_length 8 .*Raise training.max_length"):
        tiny_trainer("dpo", tmp_path, rows=[LONG] * 16, training={"max_length": 8})
    with caplog.at_level(logging.WARNING, logger="trl_plus"):
        tiny_trainer("dpo", tmp_path, rows=[LONG] * 4 + [SHORT] * 12, training={"max_length": 8})
    assert any("4 of 16 examples are dropped" in r.getMessage() for r in caplog.records)


def recipe(tmp_path, rows, max_length, mode="keep_start"):
    data = write_jsonl(rows, tmp_path / "pairs.jsonl")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "method": "dpo", "model": {"name_or_path": "tiny-llama"}, "data": {"train": {"path": data}},
        "training": {"max_length": max_length, "truncation_mode": mode},
    }))  # fmt: skip
    return str(path)


def test_validate_reports_truncation_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("validate loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    path = recipe(tmp_path, [LONG] * 3 + [SHORT], 20, "keep_end")
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert (f"warning: {path}: data.train ({tmp_path}/pairs.jsonl): max_length 20 (keep_end) truncates chosen: 3 of 4 "
            "sequences lose 30 prompt and 3 completion tokens.") in out  # fmt: skip
    assert out.rstrip().endswith(f"{path}: ok (method dpo, 2 training keys)")
    assert main(["validate", recipe(tmp_path, [SHORT] * 4, 20)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_validate_refuses_data_whose_prompts_all_fill_max_length(tmp_path, capsys):
    assert main(["validate", recipe(tmp_path, [LONG] * 5, 10)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err  # (dataset progress bars aside)
    assert "data.train" in errors[0] and "5 of 5 examples are dropped before training" in errors[0]
    assert "keep_end" in errors[0]
