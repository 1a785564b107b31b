"""Frozen models' outputs precomputed once into dataset columns, cached on disk and reused across runs and methods.

A column set is keyed by what it depends on, and nothing else:

- the data: a digest of the tokenized columns the collator reads (their Arrow record batches, in row order) and how
  the collator turns them into sequences (the core's pairwise collator, or the method's own with its config;
  ``max_length``, ``truncation_mode``);
- the source: an identity string (a model's path and the digests of its weight files, dtype and quantization, as a
  recipe run sets it; otherwise a hash of the weights in memory);
- the payload (label log-probs, top-k with its ``k``) and the trl-plus version.

So a second run with another ``output_dir``, learning rate or method (on the same data and reference) reads the
columns and runs no frozen forward; changed data or weights compute them again. Files live in
``$TRL_PLUS_CACHE/columns/<key>.arrow``; each is written to a temporary name and renamed, so concurrent runs never
read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Value
from datasets import List as ListFeature

from .._version import __version__
from ..models.cache import cache_dir, file_digest

#: Weight files whose digests name a model folder in the cache key (the rest of a folder does not change outputs,
#: except config.json, which is hashed too).
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "config.json", "adapter_config.json")


def columns_dir() -> Path:
    """Where precomputed columns are kept: ``$TRL_PLUS_CACHE/columns``."""
    return cache_dir() / "columns"


def folder_identity(path: str | Path, **settings: Any) -> str:
    """A model or adapter folder's cache identity: its resolved path, the SHA-256 of each weight file (computed once
    per process for an unchanged file) and ``settings`` (dtype, quantization: what changes the outputs); a hub name
    that is not a local folder is named as it is, with its revision in ``settings``."""
    folder = Path(path)
    parts: dict[str, Any] = {"path": str(folder.resolve()) if folder.exists() else str(path), **settings}
    if folder.is_dir():
        files = sorted({f for pattern in WEIGHT_FILES for f in folder.glob(pattern) if f.is_file()})
        parts["files"] = {f.name: file_digest(f) for f in files}
    elif folder.is_file():
        parts["files"] = {folder.name: file_digest(folder)}
    return json.dumps(parts, sort_keys=True, default=str)


def module_identity(module: Any) -> str:
    """A model in memory, named by a hash of its weights (TRL's ``hash_module``): for models given in Python without
    an identity (slow on a large model: a recipe run names its models by their files instead)."""
    from trl.trainer.utils import hash_module

    return "weights:" + hash_module(module)


def data_digest(dataset: Dataset, columns: tuple[str, ...]) -> str:
    """The SHA-256 of ``columns`` of ``dataset`` in row order (their Arrow record batches, a thousand rows at a time:
    memory stays one batch; the same rows chunked otherwise may hash otherwise: a cache miss, never a false hit)."""
    present = [name for name in columns if name in dataset.column_names]
    digest = hashlib.sha256(json.dumps(present).encode())
    # in the order the dataset gives its rows (through a selection or a shuffle too)
    for table in dataset.select_columns(present).with_format("arrow").iter(batch_size=1000):
        for batch in table.to_batches():
            digest.update(batch.serialize())
    return digest.hexdigest()


def cache_key(**parts: Any) -> str:
    """The file name of a column set: a digest of ``parts`` (data, source, payload) and the trl-plus version."""
    text = json.dumps({**parts, "trl-plus": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def column_features(columns: Mapping[str, str]) -> Features:
    """Arrow types of precomputed columns: per example, per sequence, per scored token a float32 (``"logps"``) or a
    ``k``-list of float32 / int32 (``"topk_logps"`` / ``"topk_ids"``)."""
    scalar = {"logps": Value("float32"), "topk_logps": ListFeature(Value("float32")),
              "topk_ids": ListFeature(Value("int32"))}  # fmt: skip
    return Features({name: ListFeature(ListFeature(scalar[kind])) for name, kind in columns.items()})


def cached_columns(
    key: str,
    columns: Mapping[str, str],
    compute: Callable[[], dict[str, list]],
    is_main_process: bool = True,
    wait: Callable[[], None] = lambda: None,
) -> tuple[Dataset, bool]:
    """The column set ``key`` (``columns``: name -> kind, see :func:`column_features`) from the cache, or computed
    by ``compute()`` (every process takes part: it runs the frozen forwards), written by the main process and read
    back. Returns ``(columns as a Dataset, whether they were computed)``."""
    path = columns_dir() / f"{key}.arrow"
    computed = not path.is_file()
    if computed:
        rows = compute()
        if is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            _write_arrow(tmp, rows, column_features(columns))
            tmp.replace(path)
        wait()
    return Dataset.from_file(str(path)), computed


def _write_arrow(path: Path, rows: dict[str, list], features: Features) -> None:
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=features, path=str(path)) as writer:
        writer.write_batch(rows)
        writer.finalize()
