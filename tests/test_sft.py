"""The built-in ``sft`` method (one sequence per example) and the recipe's ``data.*.columns`` mapping."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from trl_plus import TrlPlusError
from trl_plus.data.load import load_preferences
from trl_plus.data.tokenize import tokenize_completions
from trl_plus.models.tiny import build_model, build_tokenizer
from trl_plus.testing import perturb, preference_rows, train_tiny, write_jsonl
from trl_plus.trainers.preference import PlusTrainer


def sft_rows(n=32):
    return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(n)]


def test_sft_loss_is_the_models_own_completion_only_nll(dpo_args):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    perturb(model)
    trainer = PlusTrainer(model, args=dpo_args(), method="sft", train_dataset=Dataset.from_list(sft_rows(8)),
                          processing_class=tokenizer)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4  # one sequence per example
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert ours.item() == pytest.approx(reference.item(), abs=1e-5)


def test_sft_tokenizes_like_dpo_does_for_the_chosen_side(dpo_args):
    rows = preference_rows(4)
    tokenizer = build_tokenizer()
    dpo = PlusTrainer(build_model(tokenizer), args=dpo_args(), method="dpo", train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)  # fmt: skip
    for row, tokenized in zip(rows, dpo.train_dataset):
        ours = tokenize_completions(tokenizer, row["prompt"], {"chosen_ids": row["chosen"]})
        assert ours["prompt_ids"] == tokenized["prompt_ids"]
        assert ours["chosen_ids"] == tokenized["chosen_ids"]


def test_sft_training_lowers_the_completion_nll(tmp_path):
    trainer = train_tiny("sft", tmp_path, rows=sft_rows(), max_steps=8)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["sft/nll"] < 0.8 * logs[0]["sft/nll"]
    assert "rewards/margins" not in logs[0]


def test_columns_mapping_trains_sft_on_a_preference_file(tmp_path):
    path = write_jsonl(preference_rows(8), tmp_path / "prefs.jsonl")
    dataset = load_preferences(str(path), columns={"completion": "chosen"})
    assert dataset["completion"] == dataset["chosen"]
    with pytest.raises(TrlPlusError, match=r"data.train.columns.completion: the data has no column 'answer'"):
        load_preferences(str(path), columns={"completion": "answer"})
    swapped = load_preferences(str(path), columns={"chosen": "rejected", "rejected": "chosen"})  # reverse-DPO pairs
    assert swapped["chosen"] == dataset["rejected"] and swapped["rejected"] == dataset["chosen"]


def test_sft_without_a_completion_column_says_how_to_map_one(dpo_args):
    with pytest.raises(TrlPlusError, match=r"missing column 'completion'.*'sft'"):
        PlusTrainer(build_model(build_tokenizer()), args=dpo_args(), method="sft",
                    train_dataset=Dataset.from_list(preference_rows(4)), processing_class=build_tokenizer())  # fmt: skip
