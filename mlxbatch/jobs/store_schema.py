"""What the store's SQLite file holds: its tables, the changes older files get, an export row.

The tables (store.py says what each is for) are created when missing; files written by older
versions get the columns added since. Nothing here opens, locks or writes a store
(store.py and sqlite_file.py do).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY, text TEXT NOT NULL, finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    error_code TEXT, error_message TEXT, created INTEGER NOT NULL, extra TEXT
);
CREATE TABLE IF NOT EXISTS manifest (
    seq INTEGER PRIMARY KEY, line INTEGER NOT NULL, id TEXT NOT NULL, custom_id TEXT,
    sample_index INTEGER NOT NULL, n INTEGER NOT NULL, key TEXT NOT NULL, url TEXT
);
CREATE TABLE IF NOT EXISTS rendered (
    digest BLOB PRIMARY KEY, keys TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS done_spans (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY, value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY, started REAL NOT NULL, finished REAL, status TEXT NOT NULL,
    pid INTEGER NOT NULL, input TEXT, output TEXT, model TEXT, model_identity TEXT,
    kind TEXT, spec TEXT, stats TEXT, provenance TEXT
);
"""


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
    extra: dict | None = None  # e.g. parsed JSON, choice probabilities


def apply_schema(db: sqlite3.Connection) -> None:
    """Create the tables that are missing and add the columns older stores lack."""
    db.executescript(SCHEMA)
    # Stores written before results carried `extra` (parsed JSON, choice probabilities).
    columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
    if "extra" not in columns:
        db.execute("ALTER TABLE results ADD COLUMN extra TEXT")
    # Stores written before runs carried their provenance (jobs/provenance.py).
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    if "provenance" not in columns:
        db.execute("ALTER TABLE runs ADD COLUMN provenance TEXT")
