"""A window's tasks in chunks for the Ray pool, and what becomes of a chunk whose worker died.

Chunks are cut from length-sorted tasks, a few per worker so the window's end stays balanced,
and small enough that a dying worker loses little. A chunk whose worker died is retried once,
then split in halves, down to the one row that kills workers, which becomes an error record.
Nothing here talks to Ray (ray_executor.py does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlxbatch.pipeline import plan
from mlxbatch.records import Result, Task

CHUNKS_PER_WORKER = 4  # chunks per worker and window, for balance at the window's end
MAX_CHUNK_ROWS = 512  # rows per chunk at most: what one dying worker can lose
MAX_CHUNK_FAILURES = 2  # a chunk that killed this many workers is split (one row: error)


@dataclass
class Chunk:
    """Tasks generated together on one worker; `failures`: workers it was running on that died."""

    id: int
    tasks: list[Task]
    failures: int = 0


def split_chunks(todo: list[Task], workers: int, first_id: int = 0) -> list[Chunk]:
    """Length-sorted tasks cut into about CHUNKS_PER_WORKER chunks per worker."""
    ordered = plan.sort_by_length(todo)
    size = max(
        1, min(MAX_CHUNK_ROWS, math.ceil(len(ordered) / (max(1, workers) * CHUNKS_PER_WORKER)))
    )
    return [
        Chunk(first_id + n, ordered[i : i + size])
        for n, i in enumerate(range(0, len(ordered), size))
    ]


def after_failure(
    chunk: Chunk, reason: str, new_id: Callable[[], int]
) -> tuple[list[Chunk], list[Result]]:
    """What to do with a chunk whose worker died (or failed) while running it.

    Retry it once as it is; after that split it in halves (each may fail once more before it
    is split again), and a single row that still fails becomes an error record.
    """
    failures = chunk.failures + 1
    if failures < MAX_CHUNK_FAILURES:
        return [Chunk(chunk.id, chunk.tasks, failures)], []
    if len(chunk.tasks) > 1:
        half = len(chunk.tasks) // 2
        parts = (chunk.tasks[:half], chunk.tasks[half:])
        return [Chunk(new_id(), part, MAX_CHUNK_FAILURES - 1) for part in parts], []
    task = chunk.tasks[0]
    message = (
        f"the Ray worker generating this row died {failures} times "
        f"(killed, out of memory or crashed); last: {reason}"
    )
    error = Result(
        key=task.key,
        finish_reason="error",
        prompt_tokens=len(task.prompt_ids),
        error_code="worker_died",
        error_message=message,
        created=int(time.time()),
    )
    return [], [error]
