"""The on-disk cache of built models (``$TRL_PLUS_CACHE``): atomic ``build_once`` directories, file digests and
GGUF files converted once into trainable checkpoints. Light at import (torch and transformers load on use)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import TrlPlusError


def cache_dir() -> Path:
    """Where trl-plus keeps built models (``$TRL_PLUS_CACHE``, default ``~/.cache/trl-plus``)."""
    return Path(os.environ.get("TRL_PLUS_CACHE", Path.home() / ".cache" / "trl-plus")).expanduser()


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file, read in 16 MiB blocks; computed once per process for an unchanged file (a run
    resolves its model several times: tokenizer, policy, reference, evaluation)."""
    stat = Path(path).stat()
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def build_once(target: Path, build: Callable[[Path], None], marker: str = "config.json") -> str:
    """``target`` as a cached directory: when it lacks ``marker`` (``config.json``; a diffusers pipeline:
    ``model_index.json``), ``build(tmp)`` writes a sibling temporary
    directory that is then renamed into place, so concurrent processes (tests, ``accelerate launch``) never see
    half a checkpoint; the first to finish wins. A process whose build wrote no ``marker`` — transformers writes
    model files on rank 0 only once ``torch.distributed`` is up — waits for another's copy. Returns ``str(target)``."""
    import shutil
    import time

    if (target / marker).exists():
        return str(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    build(tmp)
    if not (tmp / marker).exists():  # not this process's to write: wait for the one that writes it
        shutil.rmtree(tmp, ignore_errors=True)
        for _ in range(1200):
            if (target / marker).exists():
                return str(target)
            time.sleep(0.5)
        raise TrlPlusError(f"{target}: no process wrote {marker} within 10 minutes: delete the folder and rerun")
    if target.exists() and not (target / marker).exists():  # a half copy (older trl-plus): replace it
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def gguf_problem(gguf_path: str | Path) -> str | None:
    """What is wrong with a GGUF file, read from its header and tensor table without loading it (a truncated
    download, another format), or ``None`` when it reads."""
    try:
        from gguf import GGUFReader

        GGUFReader(str(gguf_path))
    except ImportError:
        return None  # the conversion names the missing package
    except Exception as exc:
        size = Path(gguf_path).stat().st_size
        return (f"{Path(gguf_path).resolve()} is not a complete GGUF file ({size} bytes; {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): download it again")
    return None


def gguf_checkpoint(gguf_path: str | Path) -> str:
    """A plain, trainable ``save_pretrained`` checkpoint (float32 weights + tokenizer) of a GGUF file.

    transformers dequantises the GGUF weights on load, but such a model is flagged as quantized and can neither be
    fine-tuned nor saved; its weights are copied into a plain model of the same config. The result is cached under
    ``cache_dir()/gguf/<file stem>-<sha256[:16]>`` and reused by every later run (the hash is of the file's bytes,
    so a changed file is converted again). Returns the checkpoint directory.
    """
    gguf_path = Path(gguf_path)
    problem = gguf_problem(gguf_path)
    if problem:
        raise TrlPlusError(f"model.gguf_file: {problem}")
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{file_digest(gguf_path)[:16]}"
    return build_once(target, lambda tmp: _convert_gguf(gguf_path, tmp, target))


def _convert_gguf(gguf_path: Path, out: Path, target: Path) -> None:
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf_path.name} to a trainable checkpoint (once) in {target}", file=sys.stderr)
    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise TrlPlusError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
