"""Loading preference data from a local file or a hub dataset, and checking it has the columns a method needs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import TrlPlusError

if TYPE_CHECKING:
    from ..contract import Method

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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
