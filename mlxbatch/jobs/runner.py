"""run_job(spec): read -> validate -> render -> plan -> generate -> store -> export, in one place.

The input is checked in full before the model loads (`check_inputs`; a resume of an unchanged
input reuses the check its store recorded, a run over an appended-to JSONL input checks only
the new lines, and neither reads its done rows again: resume.py), then streamed a window of
rows at a time: rendered to keyed tasks, filtered against the store (only keys without a
result are generated), sorted by length, generated, and committed one batch per transaction.
SIGINT/SIGTERM, and a `--deadline` reached, stop generation at the next step; finished work
is committed and exported. Each run's provenance goes into the store and
`<output>.manifest.json`; on macOS a power assertion (jobs/power.py) keeps the machine awake
while the model loads and runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any

from mlxbatch.jobs import provenance, resume
from mlxbatch.jobs.collector import young_collections_only
from mlxbatch.jobs.deadline import Deadline
from mlxbatch.jobs.dispatch import generate_window
from mlxbatch.jobs.export import export_jsonl
from mlxbatch.jobs.export_parquet import export_parquet
from mlxbatch.jobs.inputs import InputCheck, check_inputs, check_output_path
from mlxbatch.jobs.power import keep_awake
from mlxbatch.jobs.ray_executor import RayPool
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.jobs.store import Store, StoreDamaged
from mlxbatch.jobs.summary import Committer, RunSummary, peak_rss, run_stats
from mlxbatch.jobs.windows import ReadAhead, completed_renders, render_options, task_windows
from mlxbatch.pipeline import plan
from mlxbatch.pipeline.read import input_format
from mlxbatch.records import OPENAI, Result


def open_store(spec: JobSpec) -> Store:
    try:
        return Store(spec.store_path)
    except StoreDamaged:
        if not spec.fresh:
            raise
        os.replace(spec.store_path, f"{spec.store_path}.corrupt-{int(time.time())}")
        for suffix in ("-wal", "-shm"):
            if os.path.exists(spec.store_path + suffix):
                os.unlink(spec.store_path + suffix)
        return Store(spec.store_path)


def export_outputs(store: Store, spec: JobSpec, kind: str, *, keep: bool = False) -> int:
    """Publish the output (and errors) files from the store; `keep`: the run holding the
    store may keep the output's final leading lines or row groups (export.export_jsonl,
    export_parquet.export_parquet)."""
    if input_format(spec.output_path) == "parquet":
        return export_parquet(store, spec.output_path, spec.errors_path, spec.input, keep=keep)
    model = spec.model if kind == OPENAI else None
    return export_jsonl(store, spec.output_path, spec.errors_path, openai_model=model, keep=keep)


def _progress(spec: JobSpec, total: int) -> Any:
    from tqdm import tqdm

    quiet = spec.quiet or not sys.stderr.isatty()
    return tqdm(total=total, unit="row", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def run_job(spec: JobSpec) -> RunSummary:
    """Run a whole job; returns its summary. Input problems raise before the model loads."""
    from mlxbatch.pipeline.engine import Engine

    started = time.perf_counter()
    fingerprint = resume.input_fingerprint(spec)
    check = resume.recorded_check(spec, fingerprint) or check_inputs(spec)
    check_output_path(spec.output_path)
    store = open_store(spec)
    try:
        store.lock()
        # macOS: no idle sleep until the run ends. No full garbage collections until then.
        with keep_awake(), young_collections_only():
            engine = Engine(
                spec.model,
                adapter_path=spec.adapter_path,
                dtype=spec.dtype,
                quantize=spec.quantize,
                trust_remote_code=spec.trust_remote_code,
            )
            return _run(spec, check, fingerprint, store, engine, started)
    finally:
        store.close()


def _run(
    spec: JobSpec,
    check: InputCheck,
    fingerprint: resume.Fingerprint | None,
    store: Store,
    engine: Any,
    started: float,
) -> RunSummary:
    from mlxbatch.pipeline.engine import EngineBroken
    from mlxbatch.pipeline.render import render_identity

    summary = RunSummary(rows=check.tasks, output=spec.output_path)
    deadline = Deadline.from_hhmm(spec.deadline) if spec.deadline else None
    known = provenance.start(spec, engine, check.kind)
    run_id = store.begin_run(
        input=spec.input,
        output=spec.output_path,
        model=spec.model,
        model_identity=engine.identity,
        kind=check.kind,
        spec=spec.to_dict(),
    )
    resume.record_check(store, check, fingerprint)
    if spec.fresh:
        store.clear_results()
    identity = render_identity(engine.tokenizer, **render_options(spec, engine))
    start = resume.resume_point(store, spec.input, fingerprint, identity, spec.fresh)
    stopping: list[int] = []
    late: list[bool] = []  # set when generation was cut short by the deadline
    last_export = [time.monotonic()]

    def should_stop() -> bool:
        if not (stopping or late) and deadline is not None and deadline.passed():
            late.append(True)
        return bool(stopping or late)

    def checkpoint() -> None:
        if time.monotonic() - last_export[0] >= spec.checkpoint_every:
            with summary.timing("export_seconds"):
                export_outputs(store, spec, check.kind, keep=True)
            last_export[0] = time.monotonic()

    previous = {
        s: signal.signal(s, lambda n, _: stopping.append(n))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    progress = _progress(spec, check.tasks)
    committer = Committer(store, summary, progress, checkpoint)
    if start is not None:  # done rows of an unchanged (or only grown) input, not read again
        summary.cached += start.done_tasks
        progress.update(start.done_tasks)
    pool = RayPool(spec) if spec.ray_address else None  # started at the first window with work
    generate = pool.generate_window if pool is not None else generate_window
    windows = ReadAhead(task_windows(spec, check.kind, engine, store.path, start, identity))
    try:
        for tasks in windows:
            with summary.timing("store_seconds"):
                store.add_manifest(tasks)
            todo = _pending(tasks, store, committer, summary, engine.context_length)
            if todo:
                if summary.first_generation_after is None:
                    summary.first_generation_after = time.perf_counter() - started
                summary.start_generating()
                windows.prepare_next()
                try:
                    generate(
                        todo,
                        spec,
                        engine,
                        on_result=committer.add,
                        should_stop=should_stop,
                        on_batch_size=committer.set_batch,
                    )
                except EngineBroken:
                    committer.flush()  # rows finished before it are kept; a new run resumes
                    raise
                summary.stop_generating()
            committer.flush()
            with summary.timing("store_seconds"):
                done = store.done_keys(t.key for t in tasks if not t.done)
                store.record_done(
                    completed_renders(tasks, done),
                    [t.seq for t in tasks if t.done or t.key in done],
                )
            if stopping or late:
                break
        if stopping:
            summary.status, summary.signal = "interrupted", stopping[0]
        elif late:
            summary.status, summary.deadline_reached = "interrupted", True
        summary.wall = time.perf_counter() - started
        summary.peak_memory = max(engine.stats.peak_memory, peak_rss())
        # The run is recorded before the output is published: a full disk here leaves the
        # previous output untouched.
        stats = run_stats(summary)
        prov = provenance.finish(
            known, run_id=run_id, status=summary.status, stats=stats, counts=store.counts()
        )
        store.end_run(run_id, summary.status, stats, prov)
        with summary.timing("export_seconds"):
            export_outputs(store, spec, check.kind, keep=True)
        provenance.write_manifest(provenance.manifest_path(spec.output_path), prov)
    except BaseException:
        with contextlib.suppress(Exception):
            store.end_run(run_id, "failed", run_stats(summary))
        raise
    finally:
        windows.close()  # waits for a window being prepared ahead
        if pool is not None:
            pool.close()
        progress.close()
        # Handlers stay ours until the final export is done, so a signal there is still a
        # clean stop.
        for s, handler in previous.items():
            signal.signal(s, handler)
    return summary


def _pending(
    tasks: list,
    store: Store,
    committer: Committer,
    summary: RunSummary,
    context_length: int | None,
) -> list:
    """Tasks still to generate; pre-generation failures are recorded as error results."""
    done = store.done_keys(t.key for t in tasks if not t.done)
    todo, seen = [], set()
    for task in tasks:
        if task.done or task.key in done or task.key in seen:
            summary.cached += 1
            committer.progress.update(1)
            continue
        seen.add(task.key)
        error = task.error or plan.context_error(task, context_length)
        if error is not None:
            committer.add(
                Result(
                    key=task.key,
                    finish_reason="error",
                    prompt_tokens=len(task.prompt_ids),
                    error_code=error[0],
                    error_message=error[1],
                    created=int(time.time()),
                )
            )
            continue
        todo.append(task)
    return todo
