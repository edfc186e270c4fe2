"""run_job(spec): read -> validate -> render -> plan -> generate -> store -> export, in one place.

The input is checked in full before the model loads (`check_inputs`), then streamed a window
of rows at a time: rendered to keyed tasks, filtered against the store (only keys without a
result are generated), sorted by length, generated, and committed one batch per transaction.
SIGINT/SIGTERM stop generation at the next step; finished work is committed and exported.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from mlxbatch.jobs.export import export_jsonl, export_parquet
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.jobs.store import Store, StoreDamaged
from mlxbatch.pipeline import constrain, plan
from mlxbatch.pipeline.read import check_readable, input_format, parquet_columns, read_rows
from mlxbatch.pipeline.render import TemplateError, render_tasks, render_text, template_fields
from mlxbatch.pipeline.validate import ValidationContext, detect_kind, validate_rows
from mlxbatch.records import (
    OPENAI,
    TEMPLATE,
    InputProblems,
    PrefixGroup,
    Problem,
    Request,
    Result,
    Task,
)


@dataclass
class InputCheck:
    kind: str
    requests: int
    tasks: int


def _validation_context(spec: JobSpec, kind: str, problems_cap: int = 50) -> ValidationContext:
    user_schema = None
    if spec.input_schema:
        try:
            with open(spec.input_schema, encoding="utf-8") as f:
                user_schema = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise InputProblems(
                [Problem(spec.input_schema, None, f"cannot read schema: {e}")]
            ) from None
    fields = template_fields(spec.template) if spec.template and kind == TEMPLATE else frozenset()
    return ValidationContext(
        check_constraint=constrain.check,
        read_constraint=constrain.from_row,
        file=spec.input,
        kind=kind,
        defaults=spec.default_params(),
        id_field=spec.id_field,
        template_fields=fields,
        user_schema=user_schema,
        max_problems=problems_cap,
    )


def _file_kind(spec: JobSpec) -> str:
    first = next((r.data for r in read_rows(spec.input) if r.error is None), None)
    return detect_kind(first, spec.input_format, spec.template is not None)


def check_inputs(spec: JobSpec, *, problems_cap: int = 50) -> InputCheck:
    """Read and validate the whole input; raise InputProblems with every problem found."""
    problem = check_readable(spec.input)
    if problem is not None:
        raise InputProblems([problem])
    try:
        kind = _file_kind(spec)
        ctx = _validation_context(spec, kind, problems_cap)
    except TemplateError as e:
        raise InputProblems([Problem(spec.template or "--template", None, str(e))]) from None
    job_constraint = ctx.defaults.constraint
    if job_constraint is not None:
        try:
            constrain.check(job_constraint)
        except constrain.ConstraintError as e:
            source = spec.json_schema or ("--choices" if spec.choices else "--regex")
            raise InputProblems([Problem(source, None, str(e))]) from None
    if kind == TEMPLATE and input_format(spec.input) == "parquet":
        columns = parquet_columns(spec.input)
        missing = sorted(ctx.template_fields - set(columns))
        if missing:
            names = ", ".join(repr(m) for m in missing)
            raise InputProblems(
                [Problem(spec.input, None, f"column(s) {names} used by the template are missing")]
            )
    requests = tasks = 0
    for request in validate_rows(read_rows(spec.input), ctx):
        requests += 1
        tasks += request.params.n
        if kind == TEMPLATE and spec.template:
            try:
                render_text(spec.template, request.fields or {})
            except TemplateError as e:
                ctx.report(Problem(spec.input, request.line, str(e)))
    if ctx.total_problems:
        raise InputProblems(ctx.problems, ctx.total_problems)
    return InputCheck(kind=kind, requests=requests, tasks=tasks)


def check_output_path(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputProblems([Problem(path, None, f"output directory {directory} does not exist")])


def iter_requests(spec: JobSpec, kind: str) -> Iterator[Request]:
    """The validated requests, streamed again (check_inputs has already passed)."""
    return validate_rows(read_rows(spec.input), _validation_context(spec, kind))


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


def export_outputs(store: Store, spec: JobSpec, kind: str) -> int:
    """Publish the output (and errors) files from the store."""
    if input_format(spec.output_path) == "parquet":
        return export_parquet(store, spec.output_path, spec.errors_path, read_rows(spec.input))
    model = spec.model if kind == OPENAI else None
    return export_jsonl(store, spec.output_path, spec.errors_path, openai_model=model)


@dataclass
class RunSummary:
    status: str = "completed"  # "completed" | "interrupted"
    signal: int | None = None
    rows: int = 0
    ok: int = 0
    failed: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    wall: float = 0.0
    generate_seconds: float = 0.0  # time inside generation, excluding load and export
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

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0


class _Committer:
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
            self.store.put_results(self.buffer)
            self.buffer = []
            self.checkpoint()


def _progress(spec: JobSpec, total: int) -> Any:
    from tqdm import tqdm

    quiet = spec.quiet or not sys.stderr.isatty()
    return tqdm(total=total, unit="row", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def _windows(requests: Iterator[Request], size: int) -> Iterator[list[Request]]:
    while window := list(islice(requests, size)):
        yield window


def run_job(spec: JobSpec) -> RunSummary:
    """Run a whole job; returns its summary. Input problems raise before the model loads."""
    from mlxbatch.pipeline.engine import Engine

    started = time.perf_counter()
    check = check_inputs(spec)
    check_output_path(spec.output_path)
    store = open_store(spec)
    try:
        store.lock()
        engine = Engine(
            spec.model,
            adapter_path=spec.adapter_path,
            dtype=spec.dtype,
            quantize=spec.quantize,
            trust_remote_code=spec.trust_remote_code,
        )
        return _run(spec, check, store, engine, started)
    finally:
        store.close()


def _run(spec: JobSpec, check: InputCheck, store: Store, engine: Any, started: float) -> RunSummary:
    summary = RunSummary(rows=check.tasks, output=spec.output_path)
    run_id = store.begin_run(
        input=spec.input,
        output=spec.output_path,
        model=spec.model,
        model_identity=engine.identity,
        kind=check.kind,
        spec=spec.to_dict(),
    )
    if spec.fresh:
        store.clear_results()
    store.clear_manifest()
    stopping: list[int] = []
    last_export = [time.monotonic()]

    def checkpoint() -> None:
        if time.monotonic() - last_export[0] >= spec.checkpoint_every:
            export_outputs(store, spec, check.kind)
            last_export[0] = time.monotonic()

    previous = {
        s: signal.signal(s, lambda n, _: stopping.append(n))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    progress = _progress(spec, check.tasks)
    committer = _Committer(store, summary, progress, checkpoint)
    try:
        seq = 0
        for window in _windows(iter_requests(spec, check.kind), spec.window):
            tasks = render_tasks(
                window,
                engine.tokenizer,
                model_identity=engine.identity,
                template=spec.template,
                system=spec.system,
                use_chat_template=spec.chat_template,
                first_seq=seq,
            )
            seq += len(tasks)
            store.add_manifest(tasks)
            todo = _pending(tasks, store, committer, summary, engine.context_length)
            if todo:
                summary.start_generating()
                _generate(todo, spec, engine, committer, lambda: bool(stopping))
                summary.stop_generating()
            committer.flush()
            if stopping:
                break
    finally:
        progress.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping:
        summary.status, summary.signal = "interrupted", stopping[0]
    export_outputs(store, spec, check.kind)
    summary.wall = time.perf_counter() - started
    summary.peak_memory = max(engine.stats.peak_memory, _peak_rss())
    store.end_run(run_id, summary.status, _stats(summary))
    return summary


def _generate(
    todo: list[Task], spec: JobSpec, engine: Any, committer: _Committer, should_stop: Any
) -> None:
    """Score choice tasks, then generate the rest in length-sorted, prefix-grouped batches."""

    def grouped(tasks: list[Task]) -> list[PrefixGroup]:
        ordered = plan.sort_by_length(tasks)
        return plan.group_by_prefix(ordered) if spec.prefix_cache else [PrefixGroup([], ordered)]

    choice_tasks = [t for t in todo if _constraint_type(t) == "choices"]
    if choice_tasks:
        engine.score_choices(
            grouped(choice_tasks),
            on_scores=lambda task, lps, lengths: committer.add(_choice_result(task, lps, lengths)),
            on_error=committer.add,
            should_stop=should_stop,
        )
    rest = [t for t in todo if _constraint_type(t) != "choices"]
    if not rest or should_stop():
        return
    sizes = plan.choose_batch_sizes(
        rest,
        kv_bytes_per_token=engine.kv_bytes_per_token,
        memory_budget=engine.memory_budget(),
        cap=spec.batch_size,
    )
    committer.batch = sizes.completion
    by_key = {t.key: t for t in rest}
    constrained = any(t.params.constraint for t in rest)
    engine.generate(
        grouped(rest),
        completion_batch_size=sizes.completion,
        prefill_batch_size=sizes.prefill,
        on_result=lambda r: committer.add(_parsed(by_key[r.key], r)),
        should_stop=should_stop,
        masks=_token_masks(engine) if constrained else None,
    )


def _constraint_type(task: Task) -> str | None:
    constraint = task.params.constraint
    return constraint["type"] if constraint else None


def _token_masks(engine: Any) -> constrain.TokenMasks:
    # Building llguidance's tokenizer takes about a second: once per engine.
    if getattr(engine, "token_masks", None) is None:
        vocab = int(engine.config.get("vocab_size") or len(engine.tokenizer))
        hf = engine.tokenizer._tokenizer
        engine.token_masks = constrain.TokenMasks(hf, vocab, engine.eos_ids)
    return engine.token_masks


def _parsed(task: Task, result: Result) -> Result:
    """Attach the parsed JSON of a constrained row, or its error (output cut off, ...)."""
    if result.finish_reason == "error":
        return result
    value, error = constrain.parse_output(task.params.constraint, result.text, result.finish_reason)
    if error is not None:
        result.error_code = error
        result.error_message = ERROR_MESSAGES[error]
    elif value is not None:
        result.extra["parsed"] = value
    return result


ERROR_MESSAGES = {
    "incomplete_json": "the output reached max_tokens before the JSON was complete",
    "invalid_json": "the output is not valid JSON",
    "schema_mismatch": "the output does not match the schema",
}


def _choice_result(task: Task, logprobs: list[float], lengths: list[int]) -> Result:
    assert task.params.constraint is not None
    choices = task.params.constraint["choices"]
    probs = constrain.choice_distribution(choices, logprobs)
    p = task.params
    choice = constrain.pick_choice(probs, p.temperature, f"{p.seed}:{task.id}:{task.sample_index}")
    return Result(
        key=task.key,
        text=choice,
        finish_reason="stop",
        prompt_tokens=len(task.prompt_ids),
        completion_tokens=lengths[choices.index(choice)],
        created=int(time.time()),
        extra={"parsed": choice, "choice_probs": probs},
    )


def _pending(
    tasks: list,
    store: Store,
    committer: _Committer,
    summary: RunSummary,
    context_length: int | None,
) -> list:
    """Tasks still to generate; pre-generation failures are recorded as error results."""
    done = store.done_keys(t.key for t in tasks)
    todo, seen = [], set()
    for task in tasks:
        if task.key in done or task.key in seen:
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


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _stats(summary: RunSummary) -> dict:
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
            "peak_memory",
        )
    } | {"tokens_per_second": summary.tokens_per_second}
