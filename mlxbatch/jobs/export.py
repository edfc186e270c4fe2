"""Store -> JSONL output files, published atomically, in input order.

Every file is published atomically (jobs/atomic.py): a reader sees the old file or the new
one, never half of one. Two JSONL shapes: mlxbatch records and OpenAI Batch output lines (for
OpenAI envelope inputs); Parquet is export_parquet.py's, from the same records. Failed rows
also go to `<output>.errors.jsonl`. Rows still pending are left out. A run's export copies the
leading lines it wrote before and that are final (output_prefix.py) instead of writing them
again. Nothing here generates. A write that fails (a full disk) leaves the published file as
it was and raises OSError naming it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from itertools import groupby
from typing import Any

from mlxbatch.jobs.atomic import write_atomic, write_lines_atomic
from mlxbatch.jobs.faults import FAULTS
from mlxbatch.jobs.output_prefix import kept_prefix
from mlxbatch.jobs.store import ExportRow, Store

# One encoder for every record: json.dumps with options builds a new one per call.
record_json = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode


def _error(row: ExportRow) -> dict | None:
    if row.error_code is None and row.finish_reason != "error":
        return None
    return {"code": row.error_code or "error", "message": row.error_message or ""}


def output_record(row: ExportRow) -> dict:
    """One mlxbatch output record (schemas/output.schema.json)."""
    record: dict[str, Any] = {"id": row.id}
    if row.custom_id is not None:
        record["custom_id"] = row.custom_id
    if row.n > 1:
        record["sample_index"] = row.sample_index
    record.update(
        output=row.text or "",
        **(row.extra or {}),
        finish_reason=row.finish_reason,
        usage={
            "prompt_tokens": row.prompt_tokens or 0,
            "completion_tokens": row.completion_tokens or 0,
        },
        error=_error(row),
    )
    return record


def openai_record(rows: list[ExportRow], model: str) -> dict:
    """One OpenAI Batch output line for all samples of one request."""
    first = rows[0]
    digest = hashlib.sha256("".join(r.key for r in rows).encode()).hexdigest()
    line: dict[str, Any] = {"id": f"batch_req_{digest[:24]}", "custom_id": first.custom_id}
    failed = next((r for r in rows if r.finish_reason == "error"), None)
    if failed is not None:
        return {**line, "response": None, "error": _error(failed)}
    chat = first.url == "/v1/chat/completions"
    choices = []
    for r in rows:
        choice: dict[str, Any] = {"index": r.sample_index}
        if chat:
            choice["message"] = {"role": "assistant", "content": r.text or ""}
        else:
            choice["text"] = r.text or ""
        logprobs = (r.extra or {}).get("logprobs")
        if logprobs is not None and not chat:
            logprobs = legacy_logprobs(logprobs)
        choice.update(logprobs=logprobs, finish_reason=r.finish_reason)
        choices.append(choice)
    prompt = first.prompt_tokens or 0
    completion = sum(r.completion_tokens or 0 for r in rows)
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{digest[24:48]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": max(r.created or 0 for r in rows),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    response = {"status_code": 200, "request_id": f"req_{digest[48:]}", "body": body}
    return {**line, "response": response, "error": None}


def legacy_logprobs(logprobs: dict) -> dict:
    """Chat-style `{"content": [...]}` logprobs in the /v1/completions (legacy) shape.

    `text_offset` counts characters from the start of the completion, as vLLM does without echo.
    """
    content = logprobs.get("content") or []
    offsets, position = [], 0
    for entry in content:
        offsets.append(position)
        position += len(entry["token"])
    return {
        "tokens": [e["token"] for e in content],
        "token_logprobs": [e["logprob"] for e in content],
        "top_logprobs": [
            {a["token"]: a["logprob"] for a in (e.get("top_logprobs") or [e])} for e in content
        ],
        "text_offset": offsets,
    }


def finished(rows: Iterable[ExportRow]) -> Iterator[ExportRow]:
    return (r for r in rows if r.finish_reason is not None)


def export_jsonl(
    store: Store, output: str, errors: str, *, openai_model: str | None, keep: bool = False
) -> int:
    """Write JSONL output (mlxbatch or OpenAI shape) and the errors file; return lines written.

    With `keep` (the run that holds the store), the output's leading lines that the store
    recorded as final are copied from the published file, not written again, and how far
    the new file's final lines go is recorded (output_prefix.py).
    """
    prefix = kept_prefix(store, output, openai_model) if keep else None
    err_lines: list[str] = []
    written = 0

    def write(tmp: str) -> None:
        nonlocal written
        armed = FAULTS.armed()  # the test hook, checked once per file, not per line
        with open(tmp, "wb") as f:
            if prefix is not None and prefix.kept:
                if armed:
                    FAULTS.check_file_write(f"copy:{output}")
                _copy_start(output, f, prefix.kept)
            after = prefix.seq if prefix is not None else -1
            for record, rows in _records(store, openai_model, after):
                text = record_json(record)
                failed = any(r.finish_reason == "error" or r.error_code is not None for r in rows)
                if failed:
                    err_lines.append(text)
                line = (text + "\n").encode()
                if prefix is not None:
                    prefix.add(line, rows[0].seq, rows[-1].seq, not failed)
                if armed:
                    FAULTS.check_file_write(f"line:{output}")
                f.write(line)
                written += 1
        if prefix is not None:
            prefix.record(store)  # before publishing: a failure here leaves the old file

    write_atomic(output, write)
    write_errors(errors, err_lines)
    return written + (prefix.kept_lines if prefix is not None else 0)


def _copy_start(path: str, to: Any, size: int) -> None:
    with open(path, "rb") as f:
        left = size
        while left and (chunk := f.read(min(1 << 20, left))):
            to.write(chunk)
            left -= len(chunk)
    if left:
        raise OSError(errno.EIO, "the output changed while it was copied", path)


def _records(
    store: Store, openai_model: str | None, after: int = -1
) -> Iterator[tuple[dict, list[ExportRow]]]:
    """Each output line's record and the manifest rows it is made of, for rows after seq
    `after`; rows (requests) still pending are left out."""
    if openai_model is None:
        for row in finished(store.export_rows(after)):
            yield output_record(row), [row]
        return
    for _, group in groupby(store.export_rows(after), key=lambda r: r.line):
        rows = list(group)
        if any(r.finish_reason is None for r in rows):
            continue  # a request is written once all its samples are done
        yield openai_record(rows, openai_model), rows


def write_errors(path: str, lines: list[str]) -> None:
    if lines:
        write_lines_atomic(path, lines)
    elif os.path.exists(path):
        os.unlink(path)  # a stale errors file from an earlier run would mislead
