"""The SQLite store: the single source of truth for results, keyed by content hash.

- `results`: key -> generated text (or error), written one transaction per finished batch.
- `manifest`: the current input's tasks in output order (seq -> id, sample, key); export
  joins it with `results`, so outputs can be rebuilt at any time, even during a run.
- `runs`: one row per `process` run, for `mlxbatch status`.

The store runs in WAL mode with synchronous=FULL (and fullfsync on macOS). One process at a
time holds it, through an flock on `<store>.lock` that the kernel drops when the holder dies,
so a lock left by a killed run is taken over without asking. Output files are not written here.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from mlxbatch.records import Result, Task

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, text TEXT NOT NULL, finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    error_code TEXT, error_message TEXT, created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS manifest (
    seq INTEGER PRIMARY KEY, line INTEGER NOT NULL, id TEXT NOT NULL, custom_id TEXT,
    sample_index INTEGER NOT NULL, n INTEGER NOT NULL, key TEXT NOT NULL, url TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL, status TEXT NOT NULL,
    pid INTEGER NOT NULL, input TEXT, output TEXT, model TEXT, model_identity TEXT,
    kind TEXT, spec TEXT, stats TEXT
);
"""


class StoreError(Exception):
    """A store that cannot be used: missing, damaged, or locked by another process."""


class StoreDamaged(StoreError):
    """SQLite reports the file is not a sound database."""


@dataclass
class ExportRow:
    """A manifest row joined with its result (result fields are None while pending)."""

    seq: int
    line: int
    id: Any
    custom_id: str | None
    sample_index: int
    n: int
    key: str
    url: str | None
    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error_code: str | None
    error_message: str | None
    created: int | None


class Store:
    def __init__(self, path: str, *, create: bool = True):
        self.path = path
        self._lock_fd: int | None = None
        if not create and not os.path.exists(path):
            raise StoreError(f"{path}: no such store")
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            if sys.platform == "darwin":
                self.db.execute("PRAGMA fullfsync=ON")
            check = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            if create:
                self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreDamaged(
                f"{path}: the store is damaged ({e}); run again with --fresh to start a new "
                "store (the damaged file is kept beside it)"
            ) from None

    # -- locking ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the store for this process, or raise naming the process that holds it."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"{self.path} is in use by another mlxbatch process (pid {holder}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    # -- results -----------------------------------------------------------------------------

    def clear_results(self) -> None:
        self.db.execute("DELETE FROM results")

    def done_keys(self, keys: Iterable[str]) -> set[str]:
        """The keys among `keys` that already have a successful result."""
        found: set[str] = set()
        batch = list(keys)
        for i in range(0, len(batch), 900):  # under SQLite's bound-parameter limit
            chunk = batch[i : i + 900]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT key FROM results WHERE finish_reason != 'error' AND key IN ({marks})",
                chunk,
            )
            found.update(r[0] for r in rows)
        return found

    def put_results(self, results: list[Result]) -> None:
        """Write a finished batch in one transaction."""
        rows = [
            (
                r.key,
                r.text,
                r.finish_reason,
                r.prompt_tokens,
                r.completion_tokens,
                r.error_code,
                r.error_message,
                r.created,
            )
            for r in results
        ]
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?)", rows)

    # -- manifest ----------------------------------------------------------------------------

    def clear_manifest(self) -> None:
        self.db.execute("DELETE FROM manifest")

    def add_manifest(self, tasks: list[Task]) -> None:
        rows = [
            (t.seq, t.line, json.dumps(t.id), t.custom_id, t.sample_index, t.params.n, t.key, t.url)
            for t in tasks
        ]
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO manifest VALUES (?,?,?,?,?,?,?,?)", rows)

    def export_rows(self) -> Iterator[ExportRow]:
        """Manifest rows in output order, each with its result if there is one."""
        cursor = self.db.execute(
            "SELECT m.seq, m.line, m.id, m.custom_id, m.sample_index, m.n, m.key, m.url, r.text, "
            "r.finish_reason, r.prompt_tokens, r.completion_tokens, r.error_code, "
            "r.error_message, r.created FROM manifest m LEFT JOIN results r ON r.key = m.key "
            "ORDER BY m.seq"
        )
        for row in cursor:
            yield ExportRow(row[0], row[1], json.loads(row[2]), *row[3:])

    def counts(self) -> dict[str, int]:
        row = self.db.execute(
            "SELECT COUNT(*), SUM(r.finish_reason IS NOT NULL AND r.finish_reason != 'error'), "
            "SUM(r.finish_reason = 'error'), SUM(COALESCE(r.prompt_tokens, 0)), "
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

    # -- runs --------------------------------------------------------------------------------

    def begin_run(
        self, *, input: str, output: str, model: str, model_identity: str, kind: str, spec: dict
    ) -> int:
        cursor = self.db.execute(
            "INSERT INTO runs (started, status, pid, input, output, model, model_identity, kind, "
            "spec) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?)",
            (
                time.time(),
                os.getpid(),
                input,
                output,
                model,
                model_identity,
                kind,
                json.dumps(spec, default=str),
            ),
        )
        return int(cursor.lastrowid or 0)

    def end_run(self, run_id: int, status: str, stats: dict) -> None:
        self.db.execute(
            "UPDATE runs SET finished = ?, status = ?, stats = ? WHERE run_id = ?",
            (time.time(), status, json.dumps(stats), run_id),
        )

    def last_run(self) -> dict | None:
        self.db.row_factory = sqlite3.Row
        try:
            row = self.db.execute("SELECT * FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
        finally:
            self.db.row_factory = None
        if row is None:
            return None
        run = dict(row)
        run["spec"] = json.loads(run["spec"] or "{}")
        run["stats"] = json.loads(run["stats"] or "{}")
        return run

    def _transaction(self) -> Any:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
