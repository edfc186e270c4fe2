"""A SQLite file opened for durable writes: its errors named, a process lock, transactions.

`connect` opens one in WAL mode with synchronous=FULL (and fullfsync on macOS) after an
integrity check, or read-only without writing to it at all. SQLite errors leave as
StoreError naming the file: StoreDamaged for a damaged database, and a disk-full message
(nothing committed is lost; resume once there is space). `ProcessLock` is an flock on
`<file>.lock` that the kernel drops when its holder dies, so a lock left by a killed run is
taken over without asking. It knows nothing of the store's tables (store.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from typing import Any
from urllib.request import pathname2url

DISK_FULL_HINT = (
    "finished rows are kept in the store: free some space and run the same command again to resume"
)

# SQLite messages for a file that is not a sound store (damaged pages, schema, or text).
DAMAGE_MESSAGES = (
    "malformed",
    "not a database",
    "Could not decode to UTF-8",
    "unsupported file format",
    "no such table",
    "no such column",
    "has no column named",
)


class StoreError(Exception):
    """A store that cannot be used: missing, damaged, or locked by another process."""


class StoreDamaged(StoreError):
    """SQLite reports the file is not a sound database."""


def connect(path: str, *, create: bool, read_only: bool) -> sqlite3.Connection:
    """The open database; `read_only` writes nothing at all: no WAL switch, and no -wal / -shm
    files for a cleanly closed one."""
    if (read_only or not create) and not os.path.exists(path):
        raise StoreError(f"{path}: no such store")
    try:
        if read_only:
            # A store closed cleanly has no WAL: read it as immutable. One with a WAL (a run
            # going on, or killed) is read through it.
            mode = "mode=ro" if os.path.exists(f"{path}-wal") else "immutable=1"
            uri = f"file:{pathname2url(os.path.abspath(path))}?{mode}"
            return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
        db = sqlite3.connect(path, isolation_level=None, timeout=30)
    except sqlite3.Error as e:
        raise StoreError(f"{path}: {e}") from None
    try:
        with sqlite_errors(path):
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if sys.platform == "darwin":
                db.execute("PRAGMA fullfsync=ON")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                found = [line for line in check.splitlines() if not line.startswith("***")]
                more = f" and {len(found) - 1} more" if len(found) > 1 else ""
                raise StoreDamaged(damaged(path, f"integrity check: {found[0]}{more}"))
    except StoreError:
        db.close()
        raise
    return db


def damaged(path: str, why: object) -> str:
    return (
        f"{path}: the store is damaged ({why}); run again with --fresh to start a new "
        "store (the damaged file is kept beside it)"
    )


def store_error(path: str, e: sqlite3.Error) -> StoreError:
    """A StoreError naming the file for an error SQLite raised."""
    name = getattr(e, "sqlite_errorname", None) or ""
    text = str(e)
    if name == "SQLITE_FULL" or "database or disk is full" in text:
        return StoreError(f"{path}: No space left on device ({e}); {DISK_FULL_HINT}")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or any(
        m in text for m in DAMAGE_MESSAGES
    ):
        return StoreDamaged(damaged(path, e))
    return StoreError(f"{path}: {e}")


@contextlib.contextmanager
def sqlite_errors(path: str) -> Iterator[None]:
    """SQLite's errors, and damaged bytes in a row, as StoreErrors naming `path`."""
    try:
        yield
    except sqlite3.Error as e:
        raise store_error(path, e) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # damaged bytes in a row
        raise StoreDamaged(damaged(path, f"unreadable data: {e}")) from None


class ProcessLock:
    """An flock on `<path>.lock` holding the taker's pid, for the messages of later takers."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"{path} is in use by another mlxbatch process (pid {holder}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # SQLite rolls some failures back itself (a full disk, I/O errors); a second
        # ROLLBACK would then raise and hide the error that caused it.
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
