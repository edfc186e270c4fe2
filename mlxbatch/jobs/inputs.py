"""Check a job's input in full before any model loads, and stream it again as Requests.

`check_inputs` reads every row, validates it against the record schemas (and the user's
schema), checks templates and constraints, and raises InputProblems listing everything wrong.
`check_appended` checks only the lines appended to a file that passed before (resume.py).
`iter_requests` streams the same rows again for the run. Nothing here loads a model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from mlxbatch.jobs.spec import JobSpec, read_schema_file
from mlxbatch.pipeline import constrain
from mlxbatch.pipeline.read import check_readable, input_format, parquet_columns, read_rows
from mlxbatch.pipeline.render import TemplateError, render_text, template_fields
from mlxbatch.pipeline.validate import ValidationContext, detect_kind, validate_rows
from mlxbatch.records import TEMPLATE, InputProblems, Problem, Request, SourceRow


@dataclass
class InputCheck:
    kind: str
    requests: int
    tasks: int
    # Every row's id as the duplicate check compares them, when the check read them all.
    ids: list[str] | None = field(default=None, repr=False)


def _validation_context(spec: JobSpec, kind: str, problems_cap: int = 50) -> ValidationContext:
    user_schema = read_schema_file(spec.input_schema) if spec.input_schema else None
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
        model_names=None if spec.ignore_model else model_names(spec.model),
    )


def model_names(model: str) -> frozenset[str]:
    """What an OpenAI line's body.model may say for `model`: the --model string or its basename."""
    return frozenset({model, os.path.basename(model.rstrip("/\\")) or model})


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
    requests, tasks = _count_requests(spec, kind, read_rows(spec.input), ctx)
    if ctx.total_problems:
        raise InputProblems(ctx.problems, ctx.total_problems)
    return InputCheck(kind=kind, requests=requests, tasks=tasks, ids=list(ctx.seen_ids))


def check_appended(
    spec: JobSpec, kind: str, after: tuple[int, int], ids: list[str]
) -> InputCheck | None:
    """The check of a JSONL file whose bytes up to `after` = (offset, lines) passed a check
    with row ids `ids`: only the lines after them are read. Counts and ids are those of the
    new lines; None if any is wrong or repeats an old id (a full check then says what)."""
    ctx = _validation_context(spec, kind, problems_cap=1)
    ctx.seen_ids = dict.fromkeys(ids, 0)
    requests, tasks = _count_requests(spec, kind, read_rows(spec.input, after=after), ctx)
    if ctx.total_problems:
        return None
    return InputCheck(kind=kind, requests=requests, tasks=tasks, ids=list(ctx.seen_ids)[len(ids) :])


def _count_requests(
    spec: JobSpec, kind: str, rows: Iterable[SourceRow], ctx: ValidationContext
) -> tuple[int, int]:
    """(requests, tasks) among `rows`; every problem is reported into `ctx`."""
    requests = tasks = 0
    for request in validate_rows(rows, ctx):
        requests += 1
        tasks += request.params.n
        if kind == TEMPLATE and spec.template:
            try:
                render_text(spec.template, request.fields or {})
            except TemplateError as e:
                ctx.report(Problem(spec.input, request.line, str(e)))
    return requests, tasks


def check_output_path(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputProblems([Problem(path, None, f"output directory {directory} does not exist")])


def iter_requests(
    spec: JobSpec,
    kind: str,
    skip: Callable[[int], bool] | None = None,
    after: tuple[int, int] = (0, 0),
) -> Iterator[Request]:
    """The validated requests, streamed again (check_inputs has already passed), but those on
    lines that `skip` is true for, or before `after` (read_rows)."""
    rows = read_rows(spec.input, skip, after)
    return validate_rows(rows, _validation_context(spec, kind), checked=True)
