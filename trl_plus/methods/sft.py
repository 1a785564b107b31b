"""Deprecated path (until trl-plus 0.3): import ``SFT`` from ``trl_plus``."""

import warnings

from ..builtin.sft import SFT, SFTConfig, tokenize_sft  # noqa: F401

warnings.warn("trl_plus.methods.sft moved: import SFT from trl_plus (the old path goes in trl-plus 0.3)",
              DeprecationWarning, stacklevel=2)
