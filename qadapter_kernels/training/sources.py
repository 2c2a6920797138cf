"""Where preference rows come from: files, saved datasets, the Hugging Face cache, Python objects.

Rows are read when used, not held as Python objects: a JSON Lines file is indexed by line offsets
(the file memory-mapped; a gzipped one decompressed into one bytes buffer), Parquet, CSV and
``datasets`` sources stay in Arrow. Only a JSON array is parsed whole. Every error names the row
(``path:line:`` for JSON Lines, ``... row N:`` counting from 0 otherwise) and the field.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import mmap
import os
import re
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

from .examples import PreferenceDataError, PreferenceExample, example_from_row

__all__ = ["DATA_FILE_SUFFIXES", "PreferenceRowStream", "PreferenceRows", "is_dataset_name", "load_preferences",
           "open_preferences", "source_files"]

DATA_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
BOM = b"\xef\xbb\xbf"
# Rows converted to Python objects at a time when reading Arrow sequentially.
ARROW_BATCH_ROWS = 1024


class _ListRows:
    """Rows already in Python (a list of dicts or PreferenceExamples)."""

    def __init__(self, rows: Sequence[Any], label: str) -> None:
        self.rows, self.label = rows, label

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, index: int) -> Any:
        return self.rows[index]

    def location(self, index: int) -> str:
        return f"{self.label}row {index}"

    def iter_rows(self) -> Iterator[Any]:
        return iter(self.rows)


class _ArrowRows(_ListRows):
    """Rows of a ``datasets.Dataset`` (Arrow, memory-mapped when it lives on disk)."""

    def __init__(self, dataset, label: str) -> None:
        super().__init__(dataset.with_format(None), label)

    def iter_rows(self) -> Iterator[Any]:
        for batch in self.rows.with_format("arrow").iter(batch_size=ARROW_BATCH_ROWS):
            yield from batch.to_pylist()


class _TableRows(_ListRows):
    """Rows of a pyarrow Table (Parquet, CSV): Arrow buffers, converted a batch at a time."""

    def row(self, index: int) -> Any:
        return self.rows.slice(index, 1).to_pylist()[0]

    def iter_rows(self) -> Iterator[Any]:
        for batch in self.rows.to_batches(max_chunksize=ARROW_BATCH_ROWS):
            yield from batch.to_pylist()


class _JsonLines:
    """A JSON Lines text indexed by the offsets of its non-blank lines; a line is parsed when read."""

    def __init__(self, buffer: Union[bytes, mmap.mmap], path: Path) -> None:
        self.buffer, self.path = buffer, path
        self.starts, self.ends = array("q"), array("q")
        start = len(BOM) if buffer[:len(BOM)] == BOM else 0
        while start < len(buffer):
            end = buffer.find(b"\n", start)
            end = len(buffer) if end < 0 else end
            if buffer[start:end].strip():
                self.starts.append(start)
                self.ends.append(end)
            start = end + 1

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, index: int) -> Any:
        raw = self.buffer[self.starts[index]:self.ends[index]]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None

    def location(self, index: int) -> str:
        # Counted only when an error needs it: no per-line array held for the good case.
        line = self.buffer[:self.starts[index]].count(b"\n") + 1
        return f"{self.path}:{line}"

    def iter_rows(self) -> Iterator[Any]:
        return (self.row(i) for i in range(len(self)))


class PreferenceRows(Sequence):
    """A map-style source of preference pairs: item ``i`` is row ``i`` as a ``PreferenceExample``,
    converted (and validated) when read."""

    def __init__(self, rows, description: str) -> None:
        self._rows = rows
        self.description = description

    def __len__(self) -> int:
        return len(self._rows)

    def example(self, index: int) -> PreferenceExample:
        """Row ``index`` as a pair; ``PreferenceDataError`` naming the row when it is bad."""
        return self._convert(index, lambda: self._rows.row(index))

    def _convert(self, index: int, read) -> PreferenceExample:
        try:
            return example_from_row(read())
        except ValueError as e:
            raise PreferenceDataError(f"{self._rows.location(index)}: {e}") from None

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.example(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        return self.example(index)

    def __iter__(self) -> Iterator[PreferenceExample]:
        rows = self._rows.iter_rows()
        for index in range(len(self)):
            yield self._convert(index, lambda: next(rows))


class PreferenceRowStream:
    """An iterable source read once, row after row (a ``datasets.IterableDataset``, a generator):
    each row is validated as it comes, and a bad one raises ``PreferenceDataError`` naming it."""

    def __init__(self, rows: Iterable[Any], description: str) -> None:
        self._rows = rows
        self.description = description

    def __iter__(self) -> Iterator[PreferenceExample]:
        for index, row in enumerate(self._rows):
            try:
                yield example_from_row(row)
            except ValueError as e:
                raise PreferenceDataError(f"{self.description}: row {index}: {e}") from None


Source = Union[str, os.PathLike, Sequence, Iterable, PreferenceRows, PreferenceRowStream]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(DATA_FILE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix)


def _read_bytes(path: Path) -> Union[bytes, mmap.mmap]:
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as f:
            try:
                return f.read()
            except (OSError, EOFError) as e:
                raise PreferenceDataError(f"{path}: not a readable gzip file ({e})") from None
    if path.stat().st_size == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _json_rows(path: Path):
    buffer = _read_bytes(path)
    head = bytes(buffer[:64]).removeprefix(BOM).lstrip()
    if not head.startswith(b"["):
        return _JsonLines(buffer, path)
    try:
        rows = json.loads(bytes(buffer).removeprefix(BOM).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PreferenceDataError(f"{path}: not a valid JSON array ({e})") from None
    return _ListRows(rows, f"{path}: ")


def _csv_rows(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        return _ListRows([], f"{path}: ")
    # Every column read as text: a response "42" stays a string, an empty cell an empty string.
    options = pa_csv.ConvertOptions(column_types={name: pa.string() for name in header})
    try:
        table = pa_csv.read_csv(path, convert_options=options)
    except pa.ArrowInvalid as e:
        raise PreferenceDataError(f"{path}: not a readable CSV file ({e})") from None
    return _TableRows(table, f"{path}: ")


def _parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as e:
        raise PreferenceDataError(f"{path}: not a readable Parquet file ({e})") from None
    return _TableRows(table, f"{path}: ")


def _pick_split(splits, split: str | None, label: str):
    names = list(splits)
    if split is None:
        split = names[0] if len(names) == 1 else "train" if "train" in names else None
        if split is None:
            raise PreferenceDataError(f"{label} has the splits {', '.join(names)}: name one (split=...)")
    if split not in names:
        raise PreferenceDataError(f"{label} has no split {split!r} (it has {', '.join(names)})")
    return splits[split], split


def _from_datasets(data, split: str | None, label: str):
    import datasets

    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        data, split = _pick_split(data, split, label)
        label = f"{label}[{split}]"
    if isinstance(data, datasets.IterableDataset):
        return PreferenceRowStream(data, label)
    return PreferenceRows(_ArrowRows(data, f"{label}: "), label)


# A Hub dataset id: "name" or "owner/name", and no data-file suffix (then it was meant as a file).
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


def is_dataset_name(text: str) -> bool:
    """Whether ``text`` reads as a Hub dataset id (``name`` or ``owner/name``) rather than a file path."""
    return HUB_NAME.fullmatch(text) is not None and _suffix(Path(text)) not in DATA_FILE_SUFFIXES


def _load_named(name: str):
    """A dataset in the local Hugging Face cache (set HF_DATASETS_OFFLINE=1 to never reach the network)."""
    import datasets

    try:
        return datasets.load_dataset(name)
    except Exception as e:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ...)
        raise FileNotFoundError(f"preference data not found: {name!r} is neither a file, a folder saved with "
                                f"Dataset.save_to_disk, nor a dataset in the local Hugging Face cache "
                                f"({type(e).__name__}: {e})") from None


def _from_path(path: Path, split: str | None):
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise PreferenceDataError(f"{path}: a folder, but not one written by Dataset.save_to_disk") from None
        return _from_datasets(data, split, str(path))
    readers = {".jsonl": _json_rows, ".jsonl.gz": _json_rows, ".json": _json_rows, ".json.gz": _json_rows,
               ".csv": _csv_rows, ".parquet": _parquet_rows}
    suffix = _suffix(path)
    if suffix not in readers:
        raise PreferenceDataError(f"{path}: unknown data file type {suffix!r} (one of {', '.join(readers)})")
    return PreferenceRows(readers[suffix](path), str(path))


def open_preferences(source: Source, split: str | None = None) -> PreferenceRows | PreferenceRowStream:
    """The preference rows of ``source``, read lazily, WITHOUT reading every row first.

    ``source``: a file (``.jsonl``, ``.jsonl.gz``, ``.json`` (an array or JSON Lines), ``.json.gz``,
    ``.parquet``, ``.csv``; UTF-8, a BOM allowed), a folder written by ``Dataset.save_to_disk``, the
    name of a dataset in the local Hugging Face cache, a list of row dicts or PreferenceExample objects,
    a ``datasets`` ``Dataset`` / ``DatasetDict`` / ``IterableDataset``, a pandas DataFrame, or an
    iterable of rows.
    ``split``: the split of a ``DatasetDict`` or a cached dataset (None: its only split, else "train").
    An ``IterableDataset`` or other one-pass iterable gives a ``PreferenceRowStream``.
    """
    if isinstance(source, (PreferenceRows, PreferenceRowStream)):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.exists():
            rows = _from_path(path, split)
        elif isinstance(source, str) and is_dataset_name(source):
            rows = _from_datasets(_load_named(source), split, source)
        else:
            raise FileNotFoundError(f"preference data file not found: {path}")
    elif "datasets" in sys.modules and type(source).__module__.startswith("datasets"):
        rows = _from_datasets(source, split, type(source).__name__)
    elif "pandas" in sys.modules and isinstance(source, sys.modules["pandas"].DataFrame):
        # Iterating a DataFrame gives its column names: its rows are what a user means.
        rows = PreferenceRows(_ListRows(source.to_dict("records"), "DataFrame: "), "DataFrame")
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, bytearray)):
        rows = PreferenceRows(_ListRows(source, ""), "the rows given")
    elif isinstance(source, Iterable) and not isinstance(source, (dict, bytes, bytearray, io.IOBase)):
        rows = PreferenceRowStream(source, "the rows given")
    else:
        raise TypeError(f"data must be a path, a dataset name, a list of rows or a datasets.Dataset, "
                        f"got {type(source).__name__}")
    if isinstance(rows, PreferenceRows) and not len(rows):
        raise PreferenceDataError(f"{rows.description}: no preference examples (it is empty)")
    return rows


def load_preferences(source: Source, split: str | None = None) -> list[PreferenceExample]:
    """Every pair of ``source`` (see ``open_preferences``) as a list, each row validated.

    Raises ``PreferenceDataError`` (a ValueError: ``"path:line: what"`` for JSON Lines, ``"... row N:
    what"`` otherwise, naming the field) on the first bad row or an empty source, ``FileNotFoundError``
    when the file or dataset does not exist. The list holds every pair as Python objects: for a large
    source use ``open_preferences`` or ``data.as_preference_dataset``, which read rows when needed.
    """
    examples = list(open_preferences(source, split))
    if not examples:
        raise PreferenceDataError(f"{source}: no preference examples (it is empty)")
    return examples


def source_files(source: str | os.PathLike, split: str | None = None) -> list[Path]:
    """The files whose bytes make up a file, a saved-dataset folder or a cached dataset's split
    (what a run record hashes to tell two runs' data apart)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    data = _load_named(str(source))
    if hasattr(data, "keys"):
        data, _ = _pick_split(data, split, str(source))
    return [Path(f["filename"]) for f in data.cache_files]
