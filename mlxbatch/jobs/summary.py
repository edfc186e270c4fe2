"""A run's summary (counts, tokens, timings) and the committer that fills it as results arrive.

`Committer` buffers finished results and writes them to the store one transaction per batch,
counting them into the `RunSummary` and the progress bar; `run_stats` is what the store keeps
of a run. It does not decide what runs (runner.py does).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mlxbatch.jobs.store import Store
from mlxbatch.records import Result


@dataclass
class RunSummary:
    status: str = "completed"  # "completed" | "interrupted"
    signal: int | None = None
    deadline_reached: bool = False  # stopped by --deadline (resumable, like a signal)
    rows: int = 0
    ok: int = 0
    failed: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    wall: float = 0.0
    generate_seconds: float = 0.0  # time inside generation, excluding load and export
    # Seconds from the start of the run (input check, model load, finding what is done) until
    # generation began; None when there was nothing to generate.
    first_generation_after: float | None = None
    # Time writing the store (results, manifest) and publishing outputs: overhead on generation.
    store_seconds: float = 0.0
    export_seconds: float = 0.0
    peak_memory: int = 0
    output: str = ""
    errors: list[str] = field(default_factory=list)

    _generate_started: float | None = None

    def start_generating(self) -> None:
        self._generate_started = time.perf_counter()

    def stop_generating(self) -> None:
        self.generate_seconds = self.generate_seconds_so_far()
        self._generate_started = None

    def generate_seconds_so_far(self) -> float:
        started = self._generate_started
        return self.generate_seconds + (time.perf_counter() - started if started else 0.0)

    @contextlib.contextmanager
    def timing(self, counter: str) -> Iterator[None]:
        """Add the time the block takes to the `counter` field."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - started)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0

    def line(self) -> str:
        """The one line `mlxbatch process` ends with."""
        state = "interrupted" if self.status == "interrupted" else "done"
        return (
            f"mlxbatch: {state}: {self.ok + self.cached} ok ({self.cached} cached), "
            f"{self.failed} failed of {self.rows} rows; {self.prompt_tokens} prompt + "
            f"{self.generated_tokens} generated tokens; {self.tokens_per_second:.1f} tok/s; "
            f"{self.wall:.1f} s; peak memory {self.peak_memory / 2**20:.0f} MiB -> {self.output}"
        )


class Committer:
    """Buffers finished results; one store transaction per batch; periodic checkpoints."""

    def __init__(self, store: Store, summary: RunSummary, progress: Any, checkpoint: Any):
        self.store, self.summary, self.progress, self.checkpoint = (
            store,
            summary,
            progress,
            checkpoint,
        )
        self.buffer: list[Result] = []
        self.batch = 1

    def set_batch(self, size: int) -> None:
        self.batch = size

    def add(self, result: Result) -> None:
        self.buffer.append(result)
        s = self.summary
        if result.error_code is not None:
            s.failed += 1
        else:
            s.ok += 1
            s.prompt_tokens += result.prompt_tokens
            s.generated_tokens += result.completion_tokens
        self.progress.update(1)
        if self.progress.n % 16 == 0 and s.generate_seconds_so_far() > 0:
            self.progress.set_postfix_str(
                f"{s.generated_tokens / s.generate_seconds_so_far():.0f} tok/s", refresh=False
            )
        if len(self.buffer) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            with self.summary.timing("store_seconds"):
                self.store.put_results(self.buffer)
            self.buffer = []
            self.checkpoint()


def peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_stats(summary: RunSummary) -> dict:
    """What the store records of a run and `status` shows."""
    return {
        k: getattr(summary, k)
        for k in (
            "rows",
            "ok",
            "failed",
            "cached",
            "prompt_tokens",
            "generated_tokens",
            "wall",
            "generate_seconds",
            "first_generation_after",
            "store_seconds",
            "export_seconds",
            "peak_memory",
        )
    } | {"tokens_per_second": summary.tokens_per_second}
