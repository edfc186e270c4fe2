"""Keep a Mac awake through an overnight run: a power assertion held by `caffeinate`.

On macOS (`sys.platform == "darwin"`) `keep_awake()` starts `caffeinate -i -w <pid>`: idle
system sleep is prevented while this process lives (`-w` ends the assertion even if mlxbatch is
killed), and it is stopped when the run ends. `-i` only: the display may sleep (no `-d`).
Elsewhere, or when `caffeinate` is missing or cannot start, it does nothing, silently. It does
not stop a user from sleeping the machine by hand, nor hold anything on Linux.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator


def caffeinate_command(pid: int) -> list[str] | None:
    """The command holding the assertion for process `pid`, or None where there is none."""
    if sys.platform != "darwin":
        return None
    path = shutil.which("caffeinate")
    if path is None:
        return None
    return [path, "-i", "-w", str(pid)]


@contextlib.contextmanager
def keep_awake() -> Iterator[subprocess.Popen | None]:
    """Hold a no-idle-sleep assertion for the duration of the block (macOS only)."""
    command = caffeinate_command(os.getpid())
    process = None
    if command is not None:
        with contextlib.suppress(OSError):
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
    try:
        yield process
    finally:
        if process is not None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
