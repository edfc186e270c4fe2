"""Errors the engine raises, the error record of a task that failed while generating, and
what a run does after a failing step (StepFailures)."""

from __future__ import annotations

import time
from pathlib import Path

from mlxbatch.records import Result, Task


class ModelLoadError(RuntimeError):
    """The model could not be loaded (missing, offline, unsupported)."""


def load_failed(model: str, e: Exception) -> ModelLoadError:
    """The error of a model that did not load, with a hint where it looks like a Hub name."""
    failure = f"could not load model {model!r} ({type(e).__name__}: {e})"
    if not Path(model).exists() and "/" in model:
        failure += (
            ". If this machine is offline, download it first or pass a local model directory "
            "to --model."
        )
    return ModelLoadError(failure)


class UnsupportedMlxLm(ModelLoadError):
    """mlx-lm no longer calls samplers the way sampling.py expects (see calling_batch_uids)."""


class EngineBroken(ModelLoadError):
    """Rows fail one after another, each run alone, with the same error: the model or the
    device cannot generate at all (e.g. a kernel that does not compile), not one bad row."""


# Rows failing alone the same way, none finishing between, before a run gives up.
BROKEN_AFTER = 3


class StepFailures:
    """The batch size after each failing step, and whether the row in flight fails.

    A failing step halves the batch; at one row the row in flight fails (an error record).
    The batch then goes back to full size, so one bad row does not leave the rest of the
    window to run one row at a time; unless the row ran out of memory alone: a group's rows
    run shortest first (plan.sort_by_length), so those after it stay one at a time.
    BROKEN_AFTER rows failing alone with the same error, none finishing between, raise
    EngineBroken (out-of-memory errors never do: they depend on the row).
    """

    def __init__(self, size: int):
        self.full = self.size = size
        self.streak: list[str] = []  # errors of the rows failed alone since a row finished

    def finished(self) -> None:
        """A row finished: the rows failed alone so far were bad rows, not a broken engine."""
        self.streak = []

    def failed(self, e: BaseException) -> bool:
        """Count a failing step; True when the row in flight fails, alone."""
        if self.size > 1:
            self.size = max(1, self.size // 2)
            return False
        oom, message = is_oom(e), str(e)
        self.size = 1 if oom else self.full
        if oom or message not in self.streak[-1:]:
            self.streak = []
        if not oom:
            self.streak.append(message)
        if len(self.streak) >= BROKEN_AFTER:
            first_line = message.strip().splitlines()[0] if message.strip() else type(e).__name__
            raise EngineBroken(
                f"generation failed for {len(self.streak)} rows in a row, each run alone, "
                f"with the same error: {first_line}. Finished rows are kept; run again to "
                "retry the rest"
            )
        return True


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
