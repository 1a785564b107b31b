"""Shared fixtures of the core's tests (the plugin-author fixtures come from ``trl_plus.testing``)."""

from __future__ import annotations

import pytest
from datasets import Dataset
from trl import DPOConfig

from trl_plus.testing import perturb, preference_rows  # noqa: F401 (re-exported for the tests)


@pytest.fixture
def dpo_args(tmp_path):
    """A small, deterministic, CPU-friendly DPOConfig factory."""

    def make(**overrides):
        base = dict(
            output_dir=str(tmp_path / "out"), max_steps=4, learning_rate=5e-3, per_device_train_batch_size=4,
            logging_steps=1, report_to="none", save_strategy="no", bf16=False, activation_checkpointing=False,
            disable_tqdm=True, seed=0, dataloader_pin_memory=False,
        )  # fmt: skip
        base.update(overrides)
        return DPOConfig(**base)

    return make


@pytest.fixture
def pref_dataset():
    return Dataset.from_list(preference_rows(16))


def first_batch(trainer, n: int = 4):
    """The collated first ``n`` training examples (no shuffling)."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
