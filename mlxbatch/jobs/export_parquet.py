"""Store -> a Parquet output: each input row's columns plus the output columns, one row per sample.

Published atomically like every output (atomic.py); the records and the errors file are those
of export.py; a run's export keeps the leading row groups that are final (parquet_prefix.py).
It does not write JSONL outputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mlxbatch.jobs.atomic import write_atomic
from mlxbatch.jobs.export import finished, output_record, record_json, write_errors
from mlxbatch.jobs.faults import FAULTS
from mlxbatch.jobs.parquet_prefix import kept_groups
from mlxbatch.jobs.store import Store
from mlxbatch.pipeline.read import input_format, read_rows
from mlxbatch.records import SourceRow

PARQUET_CHUNK = 8192


def export_parquet(
    store: Store, output: str, errors: str, input_path: str, *, keep: bool = False
) -> int:
    """Write Parquet: each input row's columns plus the output columns, one row per sample.

    The output columns have fixed types, and a Parquet input's columns keep the input's types,
    so a column that is null all through the first chunk (no failed row yet) does not fix its
    type as null; other columns' types come from the first chunk. With `keep` (the run that
    holds the store), the leading row groups the store recorded as final are copied from the
    published file, and only the rows after them are built (parquet_prefix.py).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from_input = pq.read_schema(input_path) if input_format(input_path) == "parquet" else None
    prefix = kept_groups(store, output, PARQUET_CHUNK) if keep else None
    kept = prefix.kept_rows if prefix is not None else 0
    after, line = (prefix.kept_seq, prefix.kept_line) if prefix is not None else (-1, 0)
    # Lines before the last kept row's are not even parsed (its line may have more samples).
    inputs = read_rows(input_path, (lambda n: n < line) if kept else None)
    current = SourceRow(0, {})
    err_lines: list[str] = []
    written = 0

    def records() -> Iterator[dict]:
        nonlocal current
        for row in finished(store.export_rows(after)):
            while current.line < row.line:
                current = next(inputs)
            record = output_record(row)
            failed = row.error_code is not None or row.finish_reason == "error"
            if failed:
                err_lines.append(record_json(record))
            if prefix is not None:
                prefix.add(row.seq, row.line, not failed)
            data = current.data if isinstance(current.data, dict) else {}
            yield {**data, **_flat(record)}

    def write(tmp: str) -> None:
        nonlocal written
        writer = _copy_groups(pq, output, tmp, prefix.groups) if prefix and kept else None
        chunk: list[dict] = []
        for record in records():
            chunk.append(record)
            if len(chunk) >= PARQUET_CHUNK:
                writer = _write_chunk(pa, pq, writer, tmp, chunk, from_input)
                written += len(chunk)
                chunk = []
        if chunk or writer is None:
            writer = _write_chunk(pa, pq, writer, tmp, chunk, from_input)
            written += len(chunk)
        writer.close()
        if prefix is not None:
            prefix.record(store, tmp)  # before publishing: a failure here leaves the old file

    write_atomic(output, write)
    write_errors(errors, err_lines)
    return written + kept


def _copy_groups(pq: Any, output: str, tmp: str, groups: int) -> Any:
    """A writer of `tmp` that holds the first `groups` row groups of the published output."""
    old = pq.ParquetFile(output)
    writer = pq.ParquetWriter(tmp, old.schema_arrow)
    for i in range(groups):
        FAULTS.check_file_write(f"copy:{output}")
        writer.write_table(old.read_row_group(i))
    return writer


def _flat(record: dict) -> dict:
    # Parsed values and choice probabilities vary in shape from row to row: JSON text columns.
    for key in ("parsed", "choice_probs"):
        if key in record:
            record[key] = json.dumps(record[key], ensure_ascii=False)
    usage = record.pop("usage")
    error = record.pop("error")
    return {
        **record,
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "error_code": error["code"] if error else None,
        "error_message": error["message"] if error else None,
    }


# Arrow types of the columns mlxbatch adds (`id` is the input's own, string or integer).
OUTPUT_TYPES = {
    "custom_id": "string",
    "sample_index": "int64",
    "output": "string",
    "parsed": "string",
    "choice_probs": "string",
    "finish_reason": "string",
    "prompt_tokens": "int64",
    "completion_tokens": "int64",
    "error_code": "string",
    "error_message": "string",
}


def _schema(pa: Any, chunk: list[dict], from_input: Any) -> Any:
    """The file's schema: the first chunk's, with fixed output types and the input's types."""
    fields = []
    for f in pa.Table.from_pylist(chunk).schema:
        kind = f.type
        if f.name in OUTPUT_TYPES:
            kind = getattr(pa, OUTPUT_TYPES[f.name])()
        elif from_input is not None and f.name != "id" and f.name in from_input.names:
            kind = from_input.field(f.name).type
        fields.append(pa.field(f.name, kind))
    return pa.schema(fields)


def _write_chunk(
    pa: Any, pq: Any, writer: Any, path: str, chunk: list[dict], from_input: Any = None
) -> Any:
    FAULTS.check_file_write(f"parquet:{path}")
    if writer is None:
        table = (
            pa.Table.from_pylist(chunk, schema=_schema(pa, chunk, from_input))
            if chunk
            else pa.table({"id": pa.array([], pa.string())})
        )
        writer = pq.ParquetWriter(path, table.schema)
    else:
        table = pa.Table.from_pylist(chunk, schema=writer.schema)
    writer.write_table(table)
    return writer
