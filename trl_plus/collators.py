"""Deprecated path (until trl-plus 0.3): import ``SequencesCollator``, ``PairwiseCollator`` and
``prompt_completion`` from ``trl_plus``."""

import warnings

from .data.collate import PairwiseCollator, SequencesCollator, prompt_completion  # noqa: F401

warnings.warn("trl_plus.collators moved: import SequencesCollator, PairwiseCollator, prompt_completion from trl_plus "
              "(the old path goes in trl-plus 0.3)", DeprecationWarning, stacklevel=2)  # fmt: skip
