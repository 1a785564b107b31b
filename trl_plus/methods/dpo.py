"""Deprecated path (until trl-plus 0.3): import ``DPO``, ``DPOConfig`` and ``dpo_losses`` from ``trl_plus``."""

import warnings

from ..builtin.dpo import DPO, DPOConfig, dpo_losses  # noqa: F401

warnings.warn("trl_plus.methods.dpo moved: import DPO, DPOConfig, dpo_losses from trl_plus (the old path goes in "
              "trl-plus 0.3)", DeprecationWarning, stacklevel=2)  # fmt: skip
