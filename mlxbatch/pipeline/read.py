"""Stream rows from .jsonl, .jsonl.gz and .parquet files, keeping line and row numbers.

Reading never holds the whole file: JSONL is read line by line, Parquet in record batches.
A line that cannot be parsed is yielded with `error` set, so validation reports every bad
line at once. Strict JSON: NaN / Infinity and strings holding unpaired surrogates (text that
cannot be written back as UTF-8) are parse errors too. A file that cannot be read to its end
(damaged gzip data, a damaged Parquet file) gives one error row where reading stopped. This
module does not check what a row contains (see validate.py).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any

from mlxbatch.records import InputProblems, Problem, SourceRow

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


def read_rows(
    path: str, skip: Callable[[int], bool] | None = None, after: tuple[int, int] = (0, 0)
) -> Iterator[SourceRow]:
    """Yield every row of `path` in file order, but those whose line (row) number `skip`
    is true for: they are not parsed at all (a resumed run's done rows). `after` = (offset,
    lines): a plain JSONL file is read from that byte offset, which ends line `lines`."""
    if input_format(path) == "parquet":
        yield from _read_parquet(path, skip)
    else:
        yield from _read_jsonl(path, skip, after)


def _open_binary(path: str) -> IO[bytes]:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_jsonl(
    path: str, skip: Callable[[int], bool] | None, after: tuple[int, int]
) -> Iterator[SourceRow]:
    offset, lines = after
    number = lines
    try:
        with _open_binary(path) as f:
            f.seek(offset)
            for number, raw in enumerate(f, start=lines + 1):
                if skip is not None and skip(number):
                    continue
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    yield SourceRow(number, error="file starts with a UTF-8 byte order mark (BOM)")
                    continue
                stripped = raw.strip()
                if not stripped:
                    continue  # blank lines (and a trailing newline) are not rows
                row = _parse_line(number, stripped)
                if row.error is not None and not raw.endswith(b"\n"):
                    row.error += " (the file ends inside this line: truncated?)"
                yield row
    except gzip.BadGzipFile as e:
        yield SourceRow(number + 1, error=f"not valid gzip data: {e}")
    except EOFError:
        yield SourceRow(number + 1, error="gzip data ends early: the file is truncated")
    except zlib.error as e:
        yield SourceRow(number + 1, error=f"damaged gzip data: {e}")
    except OSError as e:
        yield SourceRow(number + 1, error=f"cannot read the file: {e.strerror or e}")


class _NotJSON(ValueError):
    """Raised for the NaN / Infinity literals that Python's json accepts and JSON does not."""


def _reject_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not valid JSON")


# A \u escape of a UTF-16 surrogate; only then can a parsed string hold an unpaired one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _unpaired_surrogate(data: Any) -> str | None:
    """The first string (or key) in `data` holding an unpaired surrogate, escaped; else None."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return value[e.start : e.end].encode("unicode_escape").decode("ascii")
    return None


@functools.cache
def _decoder() -> json.JSONDecoder:
    # One decoder for every line: json.loads with options builds a new one per call.
    return json.JSONDecoder(parse_constant=_reject_constant)


def _parse_line(number: int, raw: bytes) -> SourceRow:
    nul = raw.find(b"\x00")
    if nul >= 0:
        return SourceRow(number, error=f"NUL byte at column {nul + 1}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return SourceRow(number, error=f"invalid UTF-8 at byte {e.start + 1}")
    try:
        data = _decoder().decode(text)
    except json.JSONDecodeError as e:
        msg = e.msg.removesuffix(" at")  # "Unterminated string starting at"
        return SourceRow(number, error=f"malformed JSON: {msg} at column {e.colno}")
    except RecursionError:
        return SourceRow(number, error="malformed JSON: nested too deeply")
    except _NotJSON as e:
        return SourceRow(number, error=f"malformed JSON: {e}")
    except ValueError as e:  # e.g. an integer past Python's digit limit
        return SourceRow(number, error=f"malformed JSON: {str(e).split(':')[0]}")
    if _SURROGATE_ESCAPE.search(raw):
        bad = _unpaired_surrogate(data)
        if bad is not None:
            return SourceRow(
                number, error=f"malformed JSON: unpaired surrogate {bad} in a string (not Unicode)"
            )
    return SourceRow(number, data=data)


def _read_parquet(path: str, skip: Callable[[int], bool] | None) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield SourceRow(1, error=_parquet_error(e))
        return
    number = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            first, size = number + 1, batch.num_rows
            kept = [i for i in range(size) if skip is None or not skip(first + i)]
            if len(kept) < size:  # (take cannot take an empty list)
                batch = batch.take(kept) if kept else batch.slice(0, 0)
            for i, row in zip(kept, batch.to_pylist(), strict=True):
                yield SourceRow(first + i, data=row)
            number = first + size - 1
    except Exception as e:  # a damaged page or column chunk, found while reading it
        yield SourceRow(number + 1, error=_parquet_error(e))


def _parquet_error(e: Exception) -> str:
    return "not a readable Parquet file: " + " ".join(str(e).split())  # pyarrow's are multi-line


def parquet_columns(path: str) -> dict[str, str]:
    """Column name -> Arrow type name, read from the file's footer only."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputProblems([Problem(path, 1, _parquet_error(e))]) from None
    return {f.name: str(f.type) for f in schema}


def is_nested_type(type_name: str) -> bool:
    return type_name.startswith(("struct", "list", "large_list", "map", "fixed_size_list"))
