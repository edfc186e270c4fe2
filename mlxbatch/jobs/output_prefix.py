"""Which leading lines of a published JSONL output the next export may keep as they are.

An export that owns its store records, in the store's `meta`, how far the output's leading
lines are final: every manifest row up to `seq` had a successful result, and a successful
result never changes, so those `size` bytes would be written again byte for byte. The next
export of the same output, in the same format, copies them, once the file is found to still
start with them, and writes only the lines after: a nightly run over 1,000,000 finished rows
and 10,000 new ones writes 10,000 lines, not 1,010,000. The manifest written again or the
results cleared drop the record (store.py); `recorded_export` reads it for parquet_prefix.py
too. It does not write output files (export.py and atomic.py do).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from mlxbatch import __version__
from mlxbatch.jobs.file_digest import start_digest
from mlxbatch.jobs.store import Store, StoreError


class OutputPrefix:
    """The final leading lines of an output: those kept from the published file (`kept`
    bytes, `kept_lines`), grown line by line as an export writes (`add`) while every row
    is final. `seq`: the last manifest seq they hold; `size`, `lines`: how much they are."""

    def __init__(
        self, output: str, form: list, seq: int = -1, size: int = 0, lines: int = 0,
        digest: Any = None,
    ):  # fmt: skip
        self.output, self.form = os.path.abspath(output), form
        self.kept, self.kept_lines = size, lines
        self.seq, self.size, self.lines = seq, size, lines
        self._digest = digest or hashlib.blake2b(digest_size=20)
        self._open = True

    def add(self, line: bytes, first_seq: int, last_seq: int, final: bool) -> None:
        """A line written for manifest rows first_seq..last_seq, all successful if `final`."""
        if not (self._open and final and first_seq == self.seq + 1):
            self._open = False  # a row not final, or left out (pending): the prefix ends
            return
        self.seq, self.size, self.lines = last_seq, self.size + len(line), self.lines + 1
        self._digest.update(line)

    def record(self, store: Store) -> None:
        value = {"output": self.output, "form": self.form, "seq": self.seq, "size": self.size,
                 "lines": self.lines, "digest": self._digest.hexdigest()}  # fmt: skip
        store.set_meta({"export": json.dumps(value)})


def recorded_export(store: Store, output: str, form: list, keys: tuple[str, ...]) -> Any:
    """(the store's export record for `output` in `form`, its `keys`' values, all ints); None
    when the record is missing, another output's or format's, or malformed."""
    try:
        recorded = json.loads(store.meta("export") or "{}")
    except (StoreError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("output") != os.path.abspath(output):
        return None
    values = [recorded.get(k) for k in keys]
    if recorded.get("form") != form or not all(isinstance(v, int) for v in values):
        return None
    return recorded, values


def kept_prefix(store: Store, output: str, openai_model: str | None) -> OutputPrefix:
    """The final lines the store recorded for `output` that the file still starts with; an
    empty prefix when there are none."""
    form = [__version__, openai_model]
    empty = OutputPrefix(output, form)
    found = recorded_export(store, output, form, ("seq", "size", "lines"))
    if found is None:
        return empty
    recorded, (seq, size, lines) = found
    start = start_digest(output, size) if size > 0 else None
    if start is None or start[0].hexdigest() != recorded.get("digest") or start[1] != lines:
        return empty  # the file was changed, replaced or cut since
    return OutputPrefix(output, form, seq, size, lines, start[0])
