"""Loading preference data from a local file or a hub dataset, and checking it has the columns a method needs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TrlPlusError

if TYPE_CHECKING:
    from ..contract import Method

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

#: Data this small is read and mapped without datasets' progress bars: on a few thousand rows each bar ("Generating
#: train split", TRL's "Tokenizing train dataset", ...) is over in about a second, and a run drew a dozen of them.
SMALL_DATA_ROWS = 10_000
SMALL_DATA_BYTES = 16 * 2**20


def few_rows(dataset: Any) -> bool:
    """Whether ``dataset`` is a ``datasets.Dataset`` of fewer than :data:`SMALL_DATA_ROWS` rows."""
    from datasets import Dataset

    return isinstance(dataset, Dataset) and len(dataset) < SMALL_DATA_ROWS


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """datasets' progress bars off inside the block when ``quiet`` (unless ``HF_DATASETS_DISABLE_PROGRESS_BARS`` is
    set: the user's choice wins), as they were after it."""
    import datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    switch = quiet and datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None and not are_progress_bars_disabled()
    if switch:
        disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            enable_progress_bars()


def check_columns(columns: Iterable[str], method: Method | type[Method], where: str) -> None:
    """Raise a clear error naming the missing column(s), the method that needs them and the columns present.

    With the default pairwise tokenization a missing ``prompt`` is allowed: TRL then extracts the shared prefix of
    ``chosen`` and ``rejected`` as the prompt (the "implicit prompt" format).
    """
    columns = list(columns)
    missing = [c for c in method.required_columns() if c not in columns]
    if missing == ["prompt"] and method.tokenize is None:
        return
    if missing:
        raise TrlPlusError(
            f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: method "
            f"{method.name!r} needs {', '.join(method.required_columns())}; the data has {', '.join(columns) or 'no columns'}"
            f" (a column named otherwise can be mapped in the recipe's data block: columns: {{{missing[0]}: <column>}})"
        )


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or directory rather than a hub id (``org/name``)."""
    return path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_FORMATS or Path(path).exists()


def load_preferences(
    path: str,
    split: str = "train",
    limit: int | None = None,
    where: str = "data.train",
    columns: dict[str, str] | None = None,
):
    """A ``datasets.Dataset`` from a local jsonl/json/parquet/csv file (or a directory of them) or a hub dataset.

    ``columns`` maps the names a method reads to the data's own (``{"completion": "chosen"}``): each such column
    is copied under the method's name, so the original stays available too.
    """
    import datasets

    if looks_local(path):
        p = Path(path).expanduser()
        if not p.exists():
            raise TrlPlusError(f"{where}.path: no such file or directory: {path}")
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_FORMATS) if p.is_dir() else [p]
        if not files or files[0].suffix not in LOCAL_FORMATS:
            raise TrlPlusError(f"{where}.path: {path} is not a {'/'.join(LOCAL_FORMATS)} file (or a folder of them)")
        try:
            with quiet_progress(sum(f.stat().st_size for f in files) < SMALL_DATA_BYTES):
                dataset = datasets.load_dataset(
                    LOCAL_FORMATS[files[0].suffix], data_files=[str(f) for f in files], split="train"
                )
        except Exception as exc:
            raise TrlPlusError(f"{where}.path: cannot read {path}: {exc}") from exc
    else:
        try:
            dataset = datasets.load_dataset(path, split=split)
        except Exception as exc:
            raise TrlPlusError(f"{where}.path: cannot load hub dataset {path!r} (split {split!r}): {exc}") from exc
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    for name, source in (columns or {}).items():
        if source not in dataset.column_names:
            raise TrlPlusError(
                f"{where}.columns.{name}: the data has no column {source!r}; it has {', '.join(dataset.column_names)}"
            )
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, dataset[source])
    return dataset
