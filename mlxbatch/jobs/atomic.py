"""Publish a file durably and atomically: write a temp file beside it, fsync, rename, fsync the dir.

A reader sees the old file or the new one, never half of one. A write that fails (a full disk)
leaves the published file as it was and raises OSError naming it, not its temp file; temp
files that a killed process left behind are removed by the next write of that file. Writes
carry the MLXBATCH_FAULT test hook (export_tmp, after_replace, enospc; see jobs/faults.py).
It knows nothing of what the files hold (export.py, datasets.py, provenance.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

from mlxbatch.jobs.faults import FAULTS


def write_atomic(path: str, write: Callable[[str], None], *, faults: bool = True) -> None:
    """Call `write(tmp_path)`, then publish tmp_path as `path` durably and atomically.

    `faults=False` keeps the MLXBATCH_FAULT test hook out of this write (metadata files).
    """
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.tmp-"
    tmp = os.path.join(directory, f"{prefix}{os.getpid()}")
    _remove_stale_temps(directory, prefix)
    try:
        write(tmp)
        if faults:
            FAULTS.point("export_tmp")
        with open(tmp, "rb+") as f:
            if faults:
                FAULTS.check_file_write(f"fsync:{path}")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            # Name the file the user asked for, not its temp file; that file is unchanged.
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise
    if faults:
        FAULTS.point("after_replace")
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(directory: str, prefix: str) -> None:
    """Delete temp files of `prefix` left by processes that died before publishing them."""
    for name in os.listdir(directory):
        pid = name[len(prefix) :]
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def write_lines_atomic(path: str, lines: Iterable[str]) -> None:
    def write(tmp: str) -> None:
        armed = FAULTS.armed()  # the test hook, checked once per file, not per line
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                if armed:
                    FAULTS.check_file_write(f"line:{path}")
                f.write(line)
                f.write("\n")

    write_atomic(path, write)
