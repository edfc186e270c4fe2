"""Stream rows from .jsonl, .jsonl.gz and .parquet files, keeping line and row numbers.

Reading never holds the whole file: JSONL is read line by line, Parquet in record batches.
A line that cannot be parsed is yielded with `error` set, so validation reports every bad
line at once. This module does not check what a row contains (see validate.py).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import IO

from mlxbatch.records import Problem, SourceRow

PARQUET_BATCH_ROWS = 4096


def input_format(path: str) -> str:
    """'jsonl' or 'parquet', from the file name."""
    name = path.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    return "jsonl"


def check_readable(path: str) -> Problem | None:
    """A problem if `path` is not a readable regular file."""
    if not os.path.exists(path):
        return Problem(path, None, "no such file")
    if os.path.isdir(path):
        return Problem(path, None, "is a directory, not an input file")
    if not os.access(path, os.R_OK):
        return Problem(path, None, "permission denied")
    return None


def read_rows(path: str) -> Iterator[SourceRow]:
    """Yield every row of `path` in file order."""
    if input_format(path) == "parquet":
        yield from _read_parquet(path)
    else:
        yield from _read_jsonl(path)


def _open_binary(path: str) -> IO[bytes]:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_jsonl(path: str) -> Iterator[SourceRow]:
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                yield SourceRow(number, error="file starts with a UTF-8 byte order mark (BOM)")
                continue
            stripped = raw.strip()
            if not stripped:
                continue  # blank lines (and a trailing newline) are not rows
            yield _parse_line(number, stripped)


def _parse_line(number: int, raw: bytes) -> SourceRow:
    nul = raw.find(b"\x00")
    if nul >= 0:
        return SourceRow(number, error=f"NUL byte at column {nul + 1}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return SourceRow(number, error=f"invalid UTF-8 at byte {e.start + 1}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return SourceRow(number, error=f"malformed JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return SourceRow(number, error="malformed JSON: nested too deeply")
    return SourceRow(number, data=data)


def _read_parquet(path: str) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield SourceRow(1, error=f"not a readable Parquet file: {e}")
        return
    number = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield SourceRow(number, data=row)


def parquet_columns(path: str) -> dict[str, str]:
    """Column name -> Arrow type name, read from the file's footer only."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    return {f.name: str(f.type) for f in schema}


def is_nested_type(type_name: str) -> bool:
    return type_name.startswith(("struct", "list", "large_list", "map", "fixed_size_list"))
