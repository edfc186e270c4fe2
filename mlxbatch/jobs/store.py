"""The SQLite store: the single source of truth for results, keyed by content hash.

- `results`: key -> generated text (or error), written one transaction per finished batch.
- `manifest`: the current input's tasks in output order (seq -> id, sample, key); export
  joins it with `results`, so outputs can be rebuilt at any time, even during a run.
- `rendered`: a request's digest (pipeline/render.request_digest) -> its task keys, written
  once all of them have results, so a resumed or nightly run skips rows already done without
  rendering them again.
- `done_spans`: runs of manifest seqs that hold a successful result, written with `rendered`,
  so a resume looks up only the seqs outside them (1M rows: 3.1 s of lookups otherwise).
- `meta`: the last input check's result (with every row's id) and what the manifest was
  written for, under their fingerprints (jobs/resume.py), so a run over an unchanged or
  appended-to input skips what is done; how far the output's lines are final
  (output_prefix.py), so an export writes only the lines after them.
- `runs`: one row per `process` run (settings, stats, provenance), for `mlxbatch status`.

How the file is opened, locked and written durably, and how SQLite's errors are named, is in
sqlite_file.py; its tables and their migrations in store_schema.py. One process at a time
holds a store. Output files are not written here. Its writes carry the fault-injection
points of jobs/faults.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Any

from mlxbatch.jobs.faults import FAULTS
from mlxbatch.jobs.spans import gaps_between, spans_of
from mlxbatch.jobs.sqlite_file import (
    DISK_FULL_HINT,
    ProcessLock,
    StoreDamaged,
    StoreError,
    Transaction,
    connect,
    sqlite_errors,
)
from mlxbatch.jobs.store_schema import ExportRow, apply_schema
from mlxbatch.records import Result, Task

__all__ = ["DISK_FULL_HINT", "ExportRow", "Store", "StoreDamaged", "StoreError"]


class Store:
    def __init__(self, path: str, *, create: bool = True, read_only: bool = False):
        """Open (or create) the store; `read_only` opens an existing one without writing to
        it at all (sqlite_file.connect)."""
        self.path = path
        self._lock: ProcessLock | None = None
        self.db = connect(path, create=create, read_only=read_only)
        if read_only or not create:
            return
        try:
            with self._sqlite_errors():
                apply_schema(self.db)
        except StoreError:
            self.db.close()
            raise

    def _sqlite_errors(self) -> Any:
        return sqlite_errors(self.path)

    def _write_fault(self, what: str) -> None:
        if FAULTS.disk_full(f"store:{what}"):
            raise sqlite3.OperationalError("database or disk is full")

    def _transaction(self) -> Transaction:
        return Transaction(self.db)

    def lock(self) -> None:
        """Take the store for this process, or raise naming the process that holds it."""
        self._lock = ProcessLock(self.path)

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- results -----------------------------------------------------------------------------

    def clear_results(self) -> None:
        with self._sqlite_errors():
            self._write_fault("clear_results")
            self.db.execute("DELETE FROM results")
            self.db.execute("DELETE FROM rendered")
            self.db.execute("DELETE FROM done_spans")
            self.db.execute("DELETE FROM meta WHERE name = 'export'")  # output_prefix.py

    def done_keys(self, keys: Iterable[str]) -> set[str]:
        """The keys among `keys` that already have a successful result."""
        query = "SELECT key FROM results WHERE finish_reason != 'error' AND key IN ({})"
        return {row[0] for row in self._select_in(query, list(keys))}

    def _select_in(self, query: str, values: list) -> list[tuple]:
        """Rows of `query` whose IN ({}) list is `values`, in chunks under SQLite's limit."""
        # 999 bound parameters before SQLite 3.32, 32,766 since.
        step = 32_000 if sqlite3.sqlite_version_info >= (3, 32) else 900
        rows: list[tuple] = []
        with self._sqlite_errors():
            for i in range(0, len(values), step):
                chunk = values[i : i + step]
                marks = ",".join("?" * len(chunk))
                rows += self.db.execute(query.format(marks), chunk).fetchall()
        return rows

    def put_results(self, results: list[Result]) -> None:
        """Write a finished batch in one transaction."""
        rows = [
            (r.key, r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.error_code,
             r.error_message, r.created,
             json.dumps(r.extra, ensure_ascii=False) if r.extra else None)
            for r in results
        ]  # fmt: skip
        FAULTS.point("before_commit")
        with self._sqlite_errors(), self._transaction():
            self._write_fault("put_results")
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?)", rows)
            FAULTS.point("in_commit")

    def rendered_keys(self, digests: list[bytes]) -> dict[bytes, list[str]]:
        """The task keys recorded for each of `digests` whose tasks are all done."""
        query = "SELECT digest, keys FROM rendered WHERE digest IN ({})"
        return {d: keys.split(",") for d, keys in self._select_in(query, digests)}

    def record_done(self, rendered: list[tuple[bytes, list[str]]], seqs: list[int]) -> None:
        """After a window: its requests whose tasks are all done (`rendered`), and the
        manifest seqs now holding a successful result, as spans (resume.py skips them)."""
        spans = spans_of(sorted(seqs))
        if not rendered and not spans:
            return
        with self._sqlite_errors(), self._transaction():
            self._write_fault("record_done")
            self.db.executemany(
                "INSERT OR REPLACE INTO rendered VALUES (?,?)",
                [(d, ",".join(keys)) for d, keys in rendered],
            )
            self.db.executemany(
                "INSERT INTO done_spans VALUES (?,?) ON CONFLICT(first_seq) "
                "DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
                spans,
            )

    # -- manifest ----------------------------------------------------------------------------

    def restart_manifest(self, fingerprint: str | None) -> None:
        """Empty the manifest for a run to write it again, under `fingerprint` (resume.py)."""
        with self._sqlite_errors():
            self._write_fault("clear_manifest")
            with self._transaction():
                self.db.execute("DELETE FROM manifest")
                self.db.execute("DELETE FROM done_spans")
                self.db.execute("DELETE FROM meta WHERE name IN ('manifest', 'export')")
                if fingerprint is not None:
                    self.db.execute("INSERT INTO meta VALUES ('manifest', ?)", (fingerprint,))

    def manifest_requests_to_redo(self) -> list[tuple[int, int, int]]:
        """(line, first seq, n) of each manifest request with a sample lacking a successful
        result, in line order. Only seqs outside the recorded done spans are looked up."""
        query = (
            "SELECT m.line, MIN(m.seq - m.sample_index), MAX(m.n) FROM manifest m "
            "WHERE m.seq BETWEEN ? AND ? AND NOT EXISTS (SELECT 1 FROM results r "
            "WHERE r.key = m.key AND r.finish_reason != 'error') GROUP BY m.line"
        )
        _, end = self.manifest_extent()
        redo: dict[int, tuple[int, int, int]] = {}
        with self._sqlite_errors():
            done = self.db.execute("SELECT first_seq, last_seq FROM done_spans ORDER BY 1")
            for gap in gaps_between(done, end):
                for row in self.db.execute(query, gap):
                    redo.setdefault(row[0], row)  # a request's samples may fall in two gaps
        return sorted(redo.values())

    def manifest_extent(self) -> tuple[int, int]:
        """(last line, seq after the last) of the manifest; (0, 0) when it is empty."""
        with self._sqlite_errors():
            line, seq = self.db.execute("SELECT MAX(line), MAX(seq) FROM manifest").fetchone()
        return (line, seq + 1) if seq is not None else (0, 0)

    def add_manifest(self, tasks: list[Task]) -> None:
        rows = [
            (t.seq, t.line, json.dumps(t.id), t.custom_id, t.sample_index, t.params.n, t.key, t.url)
            for t in tasks
        ]
        with self._sqlite_errors(), self._transaction():
            self._write_fault("add_manifest")
            self.db.executemany("INSERT OR REPLACE INTO manifest VALUES (?,?,?,?,?,?,?,?)", rows)

    def export_rows(self, after: int = -1) -> Iterator[ExportRow]:
        """Manifest rows after seq `after` in output order, each with its result if any."""
        with self._sqlite_errors():
            cursor = self.db.execute(
                "SELECT m.seq, m.line, m.id, m.custom_id, m.sample_index, m.n, m.key, m.url, "
                "r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.error_code, "
                "r.error_message, r.created, r.extra FROM manifest m "
                "LEFT JOIN results r ON r.key = m.key WHERE m.seq > ? ORDER BY m.seq",
                (after,),
            )
            for row in cursor:
                (seq, line, row_id, custom_id, sample, n, key, url, text, finish, prompt_tokens,
                 completion_tokens, code, message, created, extra) = row  # fmt: skip
                yield ExportRow(
                    seq, line, json.loads(row_id), custom_id, sample, n, key, url, text, finish,
                    prompt_tokens, completion_tokens, code, message, created,
                    json.loads(extra) if extra else None,
                )  # fmt: skip

    def counts(self) -> dict[str, int]:
        with self._sqlite_errors():
            row = self.db.execute(
                "SELECT COUNT(*), SUM(r.finish_reason IS NOT NULL AND r.error_code IS NULL), "
                "SUM(r.error_code IS NOT NULL), SUM(COALESCE(r.prompt_tokens, 0)), "
                "SUM(COALESCE(r.completion_tokens, 0)) "
                "FROM manifest m LEFT JOIN results r ON r.key = m.key"
            ).fetchone()
        total, ok, failed = row[0], row[1] or 0, row[2] or 0
        return {
            "rows": total,
            "done": ok,
            "failed": failed,
            "pending": total - ok - failed,
            "prompt_tokens": row[3] or 0,
            "completion_tokens": row[4] or 0,
        }

    def result_counts(self) -> dict[str, int]:
        """Stored results: those the current manifest uses, and those left from other settings.

        A result's key covers the model, the prompt's tokens and the generation parameters, so
        results made under other settings (or for rows no longer in the input) are never used
        for the current rows; they stay in the store until --fresh clears it.
        """
        with self._sqlite_errors():
            total, current = self.db.execute(
                "SELECT COUNT(*), SUM(key IN (SELECT key FROM manifest)) FROM results"
            ).fetchone()
        return {"current": current or 0, "other": total - (current or 0)}

    # -- meta ------------------------------------------------------------------------------

    def meta(self, name: str) -> str | bytes | None:
        with self._sqlite_errors():
            row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, values: dict[str, str | bytes]) -> None:
        """Set these names' values in one transaction."""
        with self._sqlite_errors(), self._transaction():
            self._write_fault("set_meta")
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    # -- runs --------------------------------------------------------------------------------

    def begin_run(
        self, *, input: str, output: str, model: str, model_identity: str, kind: str, spec: dict
    ) -> int:
        with self._sqlite_errors():
            self._write_fault("begin_run")
            cursor = self.db.execute(
                "INSERT INTO runs (started, status, pid, input, output, model, model_identity, "
                "kind, spec) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), os.getpid(), input, output, model, model_identity, kind,
                 json.dumps(spec, default=str)),
            )  # fmt: skip
        return int(cursor.lastrowid or 0)

    def end_run(
        self, run_id: int, status: str, stats: dict, provenance: dict | None = None
    ) -> None:
        with self._sqlite_errors():
            self._write_fault("end_run")
            self.db.execute(
                "UPDATE runs SET finished = ?, status = ?, stats = ?, provenance = ? "
                "WHERE run_id = ?",
                (time.time(), status, json.dumps(stats),
                 json.dumps(provenance, default=str) if provenance is not None else None, run_id),
            )  # fmt: skip

    def last_run(self) -> dict | None:
        return self._run("SELECT * FROM runs ORDER BY run_id DESC LIMIT 1")

    def run_before(self, run_id: int) -> dict | None:
        """The run that came before run `run_id`, if any."""
        return self._run(
            "SELECT * FROM runs WHERE run_id < ? ORDER BY run_id DESC LIMIT 1", (run_id,)
        )

    def _run(self, query: str, args: tuple = ()) -> dict | None:
        self.db.row_factory = sqlite3.Row
        try:
            with self._sqlite_errors():
                row = self.db.execute(query, args).fetchone()
                if row is None:
                    return None
                run = dict(row)
                run["spec"] = json.loads(run["spec"] or "{}")
                run["stats"] = json.loads(run["stats"] or "{}")
                run["provenance"] = json.loads(run.get("provenance") or "null")
        finally:
            self.db.row_factory = None
        return run
