"""Fault injection for tests (tests/test_faults*.py); inert unless MLXBATCH_FAULT is set.

MLXBATCH_FAULT=<point>[:<n>] kills this process with SIGKILL the n-th time (default: first) it
reaches <point>:
  before_commit   (store.py) a finished batch, generated, before its transaction begins
  in_commit       (store.py) inside that transaction, rows written, before COMMIT
  export_tmp      (atomic.py) the temp output file written, not yet fsynced or published
  after_replace   (atomic.py) the output replaced, its directory not yet fsynced
MLXBATCH_FAULT=enospc:<n> makes the n-th and every later write fail as on a full disk: a store
write raises SQLite's "database or disk is full", an output-file write OSError(ENOSPC).
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "MLXBATCH_FAULT"


class _Faults:
    """The MLXBATCH_FAULT test hook (see the module docstring)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.fired: str | None = None  # where the first injected disk-full error was raised

    def armed(self) -> bool:
        return bool(os.environ.get(FAULT_ENV))

    def reset(self) -> None:
        self.counts, self.fired = {}, None

    def _reached(self, name: str) -> int:
        """How many times `name` was reached, if MLXBATCH_FAULT targets it; else 0."""
        spec = os.environ.get(FAULT_ENV)
        if not spec or spec.partition(":")[0] != name:
            return 0
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.counts[name]

    @staticmethod
    def _n() -> int:
        return int(os.environ[FAULT_ENV].partition(":")[2] or 1)

    def point(self, name: str) -> None:
        reached = self._reached(name)
        if reached and reached == self._n():
            os.kill(os.getpid(), signal.SIGKILL)

    def disk_full(self, where: str) -> bool:
        """True if this write should fail as on a full disk."""
        reached = self._reached("enospc")
        if not reached or reached < self._n():
            return False
        self.fired = self.fired or where
        return True

    def check_file_write(self, where: str) -> None:
        if self.disk_full(where):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FAULTS = _Faults()
