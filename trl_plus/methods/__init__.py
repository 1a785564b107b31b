"""Deprecated: the built-in methods moved to ``trl_plus.builtin``; import ``DPO``, ``DPOConfig``, ``SFT`` from
``trl_plus``. ``trl_plus.methods.dpo`` and ``trl_plus.methods.sft`` keep working until trl-plus 0.3."""
