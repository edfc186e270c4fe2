"""Errors the engine raises, and the error record of a task that failed while generating."""

from __future__ import annotations

import time

from mlxbatch.records import Result, Task


class ModelLoadError(RuntimeError):
    """The model could not be loaded (missing, offline, unsupported)."""


class UnsupportedMlxLm(ModelLoadError):
    """mlx-lm no longer calls samplers the way sampling.py expects (see calling_batch_uids)."""


def is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "memory" in text or "alloc" in text


def error_result(task: Task, code: str, message: str) -> Result:
    return Result(
        key=task.key,
        finish_reason="error",
        prompt_tokens=len(task.prompt_ids),
        error_code=code,
        error_message=message,
        created=int(time.time()),
    )
