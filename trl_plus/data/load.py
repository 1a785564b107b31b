"""Loading preference data from a local file or a hub dataset, and checking it has the columns a method needs."""

from __future__ import annotations

import contextlib
import json
import math
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
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

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


def check_text_columns(features: Any, method: Method | type[Method], where: str) -> None:
    """The method's text columns (``data_fields``: prompt, chosen, ...) must hold strings or chat messages (lists of
    ``{role, content}``): a clear error naming the column and its type, instead of a tokenizer traceback later."""
    from datasets import Value

    for name in method.data_fields:
        feature = features.get(name) if features is not None else None
        if feature is None:
            continue
        inner = getattr(feature, "feature", None)  # a List(...) of messages
        text = isinstance(feature, Value) and feature.dtype in ("string", "large_string")
        messages = isinstance(inner, dict) and "content" in inner
        if not (text or messages):
            kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
            raise TrlPlusError(f"{where}: column {name!r} holds {kind} values; method {method.name!r} reads text there "
                               "(a string, or a list of chat messages with role and content)")  # fmt: skip


def is_messages(feature: Any) -> bool:
    """Whether a ``datasets`` feature holds chat messages (a list of ``{role, content}``)."""
    inner = getattr(feature, "feature", None)
    return isinstance(inner, dict) and "content" in inner


def message_columns(features: Any, method: Method | type[Method]) -> list[str]:
    """The method's text columns that hold chat messages (they need the tokenizer's chat template)."""
    return [name for name in method.data_fields if features is not None and is_messages(features.get(name))]


def _blank_rows(column: Any, allow_empty: bool) -> list[int]:
    """Indices of the null values of a pyarrow column (and of the empty or blank ones unless ``allow_empty``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    bad = pc.is_null(column)
    if not allow_empty and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        bad = pc.or_kleene(bad, pc.equal(pc.utf8_trim_whitespace(column), ""))
    elif not allow_empty and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        bad = pc.or_kleene(bad, pc.equal(pc.list_value_length(column), 0))
    return pc.indices_nonzero(pc.fill_null(bad, True)).to_pylist()


def _rows(indices: list[int], path: str | None) -> str:
    """``row 3 (line 3 of f.jsonl)`` for the first of ``indices`` (rows counted from 1), and how many more."""
    first = indices[0] + 1
    where = f"row {first}"
    if path and Path(path).suffix == ".jsonl" and Path(path).is_file():  # row n is the n-th non-blank line
        with open(path, "rb") as f:
            lines = (number for number, line in enumerate(f, 1) if line.strip())
            line = next((n for i, n in enumerate(lines, 1) if i == first), None)
        where += f" (line {line} of {Path(path).resolve()})" if line else ""
    return where + (f" and {len(indices) - 1} more row{'s' if len(indices) > 2 else ''}" if len(indices) > 1 else "")


def check_rows(dataset: Any, method: Method | type[Method], where: str, path: str | None = None):
    """Every row has the method's text fields (``data_fields``): none null, no completion empty (a prompt may be);
    an error names the field, the first such row (and its line in a jsonl file) and the fix. Pairs whose chosen
    equals their rejected teach nothing: they are left out, with a warning that counts them. Returns the dataset
    (without those pairs) and the warnings."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return dataset, []
    table = dataset.with_format("arrow")
    for name in method.data_fields:
        if name not in dataset.column_names:
            continue
        bad = _blank_rows(table[name], allow_empty=name == "prompt")
        if bad:
            raise TrlPlusError(f"{where}: {_rows(bad, path)}: {name!r} is empty or null; every row needs a "
                               f"{name} (fill it in or remove the row)")  # fmt: skip
    if not {"chosen", "rejected"} <= set(method.data_fields) or not {"chosen", "rejected"} <= set(dataset.column_names):
        return dataset, []
    chosen, rejected = table["chosen"], table["rejected"]
    if chosen.type == rejected.type and not (pa.types.is_list(chosen.type) or pa.types.is_large_list(chosen.type)):
        same = pc.indices_nonzero(pc.fill_null(pc.equal(chosen, rejected), False)).to_pylist()
    else:  # chat messages: compared as Python lists
        same = [i for i, (a, b) in enumerate(zip(chosen.to_pylist(), rejected.to_pylist())) if a == b]
    if not same:
        return dataset, []
    if len(same) == len(dataset):
        raise TrlPlusError(f"{where}: every row has chosen == rejected: there is no preference to learn")
    warning = (f"{where}: {len(same)} of {len(dataset)} rows have chosen == rejected ({_rows(same, path)}): left "
               "out, they carry no preference")  # fmt: skip
    kept = sorted(set(range(len(dataset))) - set(same))
    return dataset.select(kept), [warning]


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or directory rather than a hub id (``org/name``)."""
    return path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_FORMATS or Path(path).exists()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars (:func:`quiet_progress`) and no log lines from ``datasets`` (its own report of a bad row
    counts rows from 0)."""
    from datasets.utils import logging as ds_logging

    verbosity = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        with quiet_progress():
            yield
    finally:
        ds_logging.set_verbosity(verbosity)


def _not_utf8(number: int, line: bytes, exc: UnicodeDecodeError) -> str:
    column = len(line[: exc.start].decode()) + 1  # the bytes before the first bad one are valid UTF-8
    return f"line {number}: not UTF-8 (byte 0x{line[exc.start]:02x} at column {column}: {exc.reason})"


def _invalid_json(line: int, exc: json.JSONDecodeError) -> str:
    return f"line {line}: invalid JSON ({exc.msg}: column {exc.colno})"


def diagnose(file: Path) -> str | None:
    """What is wrong with a local data file, read line by line: ``"empty file"``, ``"line N: not UTF-8 (...)"`` or
    ``"line N: invalid JSON (...)"`` (lines counted from 1); ``None`` when none of these is."""
    if file.stat().st_size == 0:
        return "empty file"
    if file.suffix not in (".jsonl", ".json", ".csv"):
        return None
    lines = []
    with file.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode())
            except UnicodeDecodeError as exc:
                return _not_utf8(number, raw, exc)
    text = "".join(lines)
    if not text.strip():
        return "empty file"
    if file.suffix == ".csv":
        return None
    try:  # one JSON document (a .json list of rows), else JSON lines: the first bad line
        json.loads(text)
        return None
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            return _invalid_json(exc.lineno, exc)
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as exc:
            return _invalid_json(number, exc)
    return None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return " ".join(str(exc).split()) or type(exc).__name__


def read_local(files: list[Path], path: str | None, where: str):
    """``datasets.load_dataset`` on local files; when that fails (or the strings are not valid UTF-8), a one-line
    error that names the file (as ``path`` when given), the line and the cause (see :func:`diagnose`)."""
    import datasets

    with _quiet_datasets():
        try:
            dataset = datasets.load_dataset(
                LOCAL_FORMATS[files[0].suffix], data_files=[str(f) for f in files], split="train"
            )
            dataset.data.table.validate(full=True)  # pyarrow reads invalid UTF-8 in JSON into strings silently
            return dataset
        except Exception as exc:
            error = exc
    for file in files:
        problem = diagnose(file)
        if problem:
            raise TrlPlusError(f"{where}.path: {path or file}: {problem}") from error
    raise TrlPlusError(f"{where}.path: cannot read {path or files[0].parent}: {_root_cause(error)}") from error


def load_preferences(
    path: str,
    split: str = "train",
    limit: int | None = None,
    where: str = "data.train",
    columns: dict[str, str] | None = None,
    name: str | None = None,
):
    """A ``datasets.Dataset`` from a local jsonl/json/parquet/csv file (or a directory of them) or a hub dataset
    (``name``: its configuration).

    ``columns`` maps the names a method reads to the data's own (``{"completion": "chosen"}``): each such column
    is copied under the method's name, so the original stays available too.
    """
    import datasets

    if looks_local(path):
        if name is not None:
            raise TrlPlusError(f"{where}.name: {name!r} is a hub dataset's configuration, but {path} is local; drop "
                               "name, or point path at the hub dataset")  # fmt: skip
        p = Path(path).expanduser()
        if not p.exists():
            raise TrlPlusError(f"{where}.path: no such file or directory: {path}")
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_FORMATS) if p.is_dir() else [p]
        if not files or files[0].suffix not in LOCAL_FORMATS:
            raise TrlPlusError(f"{where}.path: {path} is not a {'/'.join(LOCAL_FORMATS)} file (or a folder of them)")
        dataset = read_local(files, path if p.is_file() else None, where)
    else:
        try:
            dataset = datasets.load_dataset(path, name, split=split)
        except Exception as exc:
            config = f", configuration {name!r}" if name else ""
            raise TrlPlusError(f"{where}.path: cannot load hub dataset {path!r} (split {split!r}{config}): "
                               f"{_root_cause(exc)}") from exc  # fmt: skip
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    for name, source in (columns or {}).items():
        if source not in dataset.column_names:
            raise TrlPlusError(
                f"{where}.columns.{name}: the data has no column {source!r}; it has {', '.join(dataset.column_names)}"
            )
    values = {name: dataset[source] for name, source in (columns or {}).items()}  # all read first: a swap works
    for name, column in values.items():
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, column)
    return dataset


_LIST_TYPES = {"float": (int, float), "int": (int,), "text": (str,)}


def check_lists(dataset: Any, method: Method | type[Method], where: str) -> None:
    """Every row's list columns (``Needs.list_fields``) hold lists of the declared type, as long as their
    ``same_length_as`` column: else a one-line error naming the row, the column and the fix. Rows are counted from 1
    (a JSON-lines file's line numbers, when it has no blank lines). A streaming dataset is not checked."""
    from datasets import Dataset

    specs = [spec for spec in method.needs.lists if spec.name in getattr(dataset, "column_names", ())]
    if not specs or not isinstance(dataset, Dataset):
        return
    columns = {spec.name: dataset[spec.name] for spec in specs}
    for spec in specs:
        if spec.same_length_as and spec.same_length_as not in columns:
            columns[spec.same_length_as] = dataset[spec.same_length_as]
    for spec in specs:
        kinds = _LIST_TYPES[spec.dtype]
        for row, values in enumerate(columns[spec.name], 1):
            if values is None and not spec.required:
                continue
            if not isinstance(values, list) or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
                kind = {"float": "numbers", "int": "integers", "text": "strings"}[spec.dtype]
                raise TrlPlusError(f"{where}: row {row}: column {spec.name!r} must be a list of {kind}, not "
                                   f"{_short(values)}")  # fmt: skip
            if spec.dtype == "float" and not all(math.isfinite(v) for v in values):
                bad = next(v for v in values if not math.isfinite(v))
                raise TrlPlusError(f"{where}: row {row}: column {spec.name!r} holds {bad!r}; it must hold finite numbers")
            if spec.same_length_as:
                other = columns[spec.same_length_as][row - 1]
                if isinstance(other, list) and len(other) != len(values):
                    raise TrlPlusError(
                        f"{where}: row {row}: column {spec.name!r} has {len(values)} values but {spec.same_length_as!r} "
                        f"has {len(other)}: give one per entry of {spec.same_length_as!r}"
                    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def prepare_rows(dataset: Any, method: Method, split: str, where: str) -> Any:
    """The method's :meth:`~trl_plus.Method.prepare_data` on checked raw rows; a one-line error when it leaves no
    row (or raises one, prefixed with ``where``)."""
    try:
        with quiet_progress(few_rows(dataset)):  # datasets' bars only for data large enough to wait for
            prepared = method.prepare_data(dataset, split)
    except TrlPlusError as exc:
        raise TrlPlusError(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)) from None
    if hasattr(prepared, "__len__") and len(prepared) == 0 and len(dataset) > 0:
        raise TrlPlusError(f"{where}: method {method.name!r} built no training rows from the {len(dataset)} rows of "
                           "the data: check the columns its README describes")  # fmt: skip
    try:  # the trainer then does not prepare the rows a second time
        prepared._trl_plus_prepared_by = method.name
    except AttributeError:
        pass
    return prepared


def is_prepared(dataset: Any, method: Method) -> bool:
    """Whether :func:`prepare_rows` already made ``dataset`` for ``method`` (``trl-plus train`` prepares as it
    loads), or its raw columns are gone because the method's ``prepare_data`` consumed them."""
    if getattr(dataset, "_trl_plus_prepared_by", None) == method.name:
        return True
    raw = set(method.required_columns()) <= set(getattr(dataset, "column_names", None) or ())
    return prepares_data(method) and not raw


def prepares_data(method: Method | type[Method]) -> bool:
    """Whether ``method`` overrides :meth:`~trl_plus.Method.prepare_data`."""
    from ..contract import Method

    return getattr(type(method) if isinstance(method, Method) else method, "prepare_data") is not Method.prepare_data
