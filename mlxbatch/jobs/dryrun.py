"""`mlxbatch process --dry-run`: what a run would do and about how long it would take.

It checks the input in full (as a run does), loads the model, renders and tokenizes every row,
counts tasks, prompt tokens and the most tokens they may generate, and asks the store (read
only) which results it already holds. A short calibration then times a few rows: once with one
new token (prefill) and once with a few (decode), after a warm-up, to measure tok/s on this
machine. The estimate is an upper bound (every row running to its max_tokens, with the few
rows of the calibration decoded together; a real run batches more rows and rows stop early),
and is compared with `--deadline`.

What it does not do: write anything (no output, no store, no lock, no manifest), keep the
calibration's results, or hold a power assertion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any

from mlxbatch.jobs.deadline import Deadline, duration
from mlxbatch.jobs.inputs import check_inputs, check_output_path
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.jobs.store import Store, StoreError
from mlxbatch.records import Result, Task

CALIBRATION_ROWS = 8
CALIBRATION_TOKENS = 8


@dataclass
class DryRun:
    input: str
    kind: str
    requests: int
    tasks: int = 0
    failing: int = 0  # tasks that fail before generation (unsupported parameters, ...)
    done: int | None = None  # tasks with a stored result, or a duplicate of another task
    prompt_tokens: int = 0  # of the tasks still to generate
    max_new_tokens: int = 0
    load_seconds: float = 0.0
    calibration_rows: int = 0
    calibration_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    estimate_seconds: float = 0.0
    deadline: str | None = None
    deadline_in: float | None = None
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool | None:
        if self.deadline_in is None:
            return None
        return self.estimate_seconds <= self.deadline_in


def _done_keys(path: str, keys: list[str]) -> set[str] | None:
    """Keys with a stored result, read without writing to the store; None if unreadable."""
    try:
        store = Store(path, read_only=True)
    except StoreError:
        return None
    try:
        return store.done_keys(keys)
    except StoreError:
        return None
    finally:
        store.close()


def dry_run(
    spec: JobSpec, rows: int = CALIBRATION_ROWS, tokens: int = CALIBRATION_TOKENS
) -> DryRun:
    """Count and calibrate; raises InputProblems like a run would, before the model loads."""
    from mlxbatch.jobs.windows import task_windows
    from mlxbatch.pipeline.engine import Engine

    check = check_inputs(spec)
    check_output_path(spec.output_path)
    report = DryRun(input=spec.input, kind=check.kind, requests=check.requests)
    started = time.perf_counter()
    engine = Engine(
        spec.model,
        adapter_path=spec.adapter_path,
        dtype=spec.dtype,
        quantize=spec.quantize,
        trust_remote_code=spec.trust_remote_code,
    )
    report.load_seconds = time.perf_counter() - started
    rng = random.Random(0)
    sample: list[Task] = []
    seen = 0
    for tasks in task_windows(spec, check.kind, engine):
        report.tasks += len(tasks)
        done = None if spec.fresh else _done_keys(spec.store_path, [t.key for t in tasks])
        if done is not None and report.done is None:
            report.done = 0
        twice: set[str] = set()  # a key twice in a window is generated once (as in a run)
        for task in tasks:
            if task.error is not None:
                report.failing += 1
                report.errors[task.error[0]] = report.errors.get(task.error[0], 0) + 1
                continue
            if (done is not None and task.key in done) or task.key in twice:
                report.done = (report.done or 0) + 1
                continue
            twice.add(task.key)
            report.prompt_tokens += len(task.prompt_ids)
            report.max_new_tokens += task.params.max_tokens
            seen += 1  # reservoir sampling: an even sample of the rows, in bounded memory
            if len(sample) < rows:
                sample.append(task)
            elif (j := rng.randrange(seen)) < rows:
                sample[j] = task
    if sample:
        _calibrate(report, engine, spec, sample, tokens)
    if spec.deadline:
        report.deadline = spec.deadline
        report.deadline_in = Deadline.from_hhmm(spec.deadline).remaining()
    return report


def _shortened(tasks: list[Task], max_tokens: int) -> list[Task]:
    return [
        dataclasses.replace(
            t,
            key=f"{t.key}:{max_tokens}",
            params=dataclasses.replace(t.params, max_tokens=min(max_tokens, t.params.max_tokens)),
        )
        for t in tasks
    ]


def _timed(engine: Any, spec: JobSpec, tasks: list[Task]) -> tuple[float, list[Result]]:
    from mlxbatch.jobs.dispatch import generate_window

    results: list[Result] = []
    started = time.perf_counter()
    generate_window(tasks, spec, engine, on_result=results.append, should_stop=lambda: False)
    return time.perf_counter() - started, results


def _calibrate(report: DryRun, engine: Any, spec: JobSpec, sample: list[Task], tokens: int) -> None:
    _timed(engine, spec, _shortened(sample, 1))  # warm-up: kernels, grammar tables
    prefill_s, first = _timed(engine, spec, _shortened(sample, 1))
    decode_s, full = _timed(engine, spec, _shortened(sample, tokens))
    prompt = sum(len(t.prompt_ids) for t in sample)
    extra = sum(r.completion_tokens for r in full) - sum(r.completion_tokens for r in first)
    report.calibration_rows, report.calibration_tokens = len(sample), tokens
    report.prefill_tps = prompt / prefill_s if prefill_s > 0 else 0.0
    # Decode time: what the longer run took beyond the prefill run.
    decode_time = max(decode_s - prefill_s, 1e-6)
    report.decode_tps = extra / decode_time if extra > 0 else 0.0
    estimate = report.load_seconds
    if report.prefill_tps:
        estimate += report.prompt_tokens / report.prefill_tps
    if report.decode_tps:
        estimate += report.max_new_tokens / report.decode_tps
    report.estimate_seconds = estimate


def report_lines(r: DryRun) -> list[str]:
    """The dry run as the lines `mlxbatch process --dry-run` prints."""
    lines = [f"dry run of {r.input}: nothing generated, nothing written"]
    todo = r.tasks - r.failing - (r.done or 0)
    done = f", {r.done} already in the store (or duplicates)" if r.done else ""
    lines.append(f"rows: {r.requests} ({r.kind} rows), {r.tasks} tasks{done}; {todo} to generate")
    if r.failing:
        codes = ", ".join(f"{n} {code}" for code, n in sorted(r.errors.items()))
        lines.append(f"rows that fail before generation: {r.failing} ({codes})")
    lines.append(
        f"tokens: {r.prompt_tokens} prompt to prefill; at most {r.max_new_tokens} to generate"
    )
    if r.calibration_rows:
        lines.append(
            f"calibration: {r.calibration_rows} rows x {r.calibration_tokens} tokens: prefill "
            f"{r.prefill_tps:.0f} tok/s, decode {r.decode_tps:.0f} tok/s; model load "
            f"{r.load_seconds:.1f} s"
        )
        lines.append(
            f"estimate: at most {duration(r.estimate_seconds)} (rows that stop before "
            "max_tokens, and bigger batches, take less)"
        )
    else:
        lines.append("estimate: nothing to generate")
    if r.deadline is not None and r.deadline_in is not None:
        verdict = "fits" if r.fits else "does NOT fit: the run would stop there; run it again"
        with contextlib.suppress(ZeroDivisionError):
            if not r.fits:
                share = min(1.0, r.deadline_in / r.estimate_seconds)
                verdict += f" to resume (about {share:.0%} done by then)"
        lines.append(f"deadline {r.deadline}: in {duration(r.deadline_in)}; {verdict}")
    return lines
