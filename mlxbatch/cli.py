"""The `mlxbatch` command line: process, validate, status, export.

Exit codes: 0 success; 1 input problems, failed rows over --max-errors, a locked or damaged
store, or a model that cannot load; 2 usage errors; 3 --deadline reached; 130 / 143 after
SIGINT / SIGTERM (finished rows are committed and exported first, as at a deadline). Nothing
here imports mlx: `process` reaches it through jobs/runner.py only once the input has passed
validation (and `export --format` through the tokenizer, when it needs one).
"""

from __future__ import annotations

import errno
import functools
import json
import sqlite3
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from mlxbatch import __version__
from mlxbatch.jobs.spec import JobSpec, build_spec, default_store, load_job_file
from mlxbatch.options import generation_options, input_options, store_option
from mlxbatch.records import InputProblems

EXIT_INPUT = 1
EXIT_DEADLINE = 3


def _spec(ctx: click.Context, params: dict[str, Any]) -> JobSpec:
    """Defaults < job file < flags the user actually typed."""
    job_file = params.pop("job_file", None)
    job = {}
    if job_file:
        job = load_job_file(job_file)
    typed = {
        k: v for k, v in params.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT
    }
    defaults = {k: v for k, v in params.items() if k not in typed}
    spec = build_spec({**defaults, **job}, typed)
    if not spec.input:
        raise click.UsageError("missing INPUT (give it as an argument or as 'input' in --job)")
    if spec.input_format == "rows" and not spec.template:
        raise click.UsageError("--input-format rows needs --template")
    return spec


def _report_problems(e: InputProblems) -> None:
    for problem in e.problems:
        click.echo(str(problem), err=True)
    hidden = e.total - len(e.problems)
    if hidden > 0:
        click.echo(f"... and {hidden} more problem(s)", err=True)


def _handle_input_problems(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mlxbatch.jobs.store import StoreError
        from mlxbatch.pipeline.engine import ModelLoadError

        try:
            return f(*args, **kwargs)
        except InputProblems as e:
            _report_problems(e)
            raise click.ClickException(
                f"{e.total} input problem(s); nothing was generated"
            ) from None
        except (StoreError, ModelLoadError) as e:
            raise click.ClickException(str(e)) from None
        except sqlite3.Error as e:  # the store names its file itself; this is a safety net
            raise click.ClickException(f"result store: {e}") from None
        except OSError as e:
            raise click.ClickException(_os_error(e)) from None

    return wrapper


def _os_error(e: OSError) -> str:
    from mlxbatch.jobs.store import DISK_FULL_HINT

    text = f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += f"; {DISK_FULL_HINT}"
    return text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxbatch")
def cli() -> None:
    """Run a file of prompts through a local MLX model: validated, batched, resumable."""


@cli.command()
@input_options
@generation_options
@click.pass_context
@_handle_input_problems
def process(ctx: click.Context, **params: Any) -> None:
    """Generate an output for every row of INPUT (.jsonl, .jsonl.gz or .parquet).

    Finished rows are kept in a store beside the output: re-running the same command after a
    crash, or over a grown input, generates only what is missing.
    """
    from mlxbatch.jobs.runner import run_job

    dry = params.pop("dry_run")
    spec = _spec(ctx, params)
    if dry:
        from mlxbatch.jobs.dryrun import dry_run, report_lines

        for line in report_lines(dry_run(spec)):
            click.echo(line)
        return
    summary = run_job(spec)
    if not spec.quiet:
        click.echo(summary.line(), err=True)
    if summary.signal is not None:
        ctx.exit(128 + summary.signal)
    if summary.deadline_reached:
        click.echo(
            f"mlxbatch: deadline reached; run again to resume (--deadline {spec.deadline})",
            err=True,
        )
        ctx.exit(EXIT_DEADLINE)
    if summary.failed > spec.max_errors:
        click.echo(
            f"Error: {summary.failed} row(s) failed (--max-errors {spec.max_errors}); "
            f"see {spec.errors_path}",
            err=True,
        )
        ctx.exit(EXIT_INPUT)


@cli.command()
@input_options
@click.pass_context
@_handle_input_problems
def validate(ctx: click.Context, **params: Any) -> None:
    """Check INPUT without loading a model; report every problem as file:line."""
    from mlxbatch.jobs.inputs import check_inputs

    spec = _spec(ctx, params)
    check = check_inputs(spec)
    click.echo(f"{spec.input}: {check.requests} rows OK ({check.kind} rows, {check.tasks} tasks)")


def _store_for(path: str, store: str | None) -> str:
    if store:
        return store
    return path if path.endswith(".sqlite") else default_store(path)


@cli.command()
@click.argument("output", type=click.Path())
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_handle_input_problems
def status(output: str, store: str | None, as_json: bool) -> None:
    """Show rows done / failed / pending and the last run of OUTPUT's store."""
    from mlxbatch.jobs.status import read_status, status_lines

    report = read_status(_store_for(output, store))
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for line in status_lines(report):
        click.echo(line)


@cli.command()
@click.argument("output", type=click.Path())
@store_option
@click.option(
    "-o",
    "--to",
    "--out-dir",
    "target",
    type=click.Path(),
    help="Write here instead of OUTPUT (.jsonl or .parquet); with --format, the directory "
    "for train/valid/test.jsonl  [default: data]",
)
@click.option(
    "--format",
    "dataset_format",
    type=click.Choice(["chat", "completions", "text"]),
    help="Write an mlx_lm.lora dataset (train/valid/test.jsonl) instead of the output.",
)
@click.option(
    "--split",
    help="With --format: train,valid,test fractions, by a hash of each row id  "
    "[default: 0.9,0.05,0.05]",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    help="With --format: leave out examples longer than N tokens (the model's tokenizer).",
)
@click.option(
    "--drop-truncated",
    is_flag=True,
    help="With --format: leave out outputs cut off by max_tokens (finish_reason length).",
)
@_handle_input_problems
def export(
    output: str,
    store: str | None,
    target: str | None,
    dataset_format: str | None,
    split: str | None,
    max_length: int | None,
    drop_truncated: bool,
) -> None:
    """Write OUTPUT again from its store, atomically; works while a run is going on.

    With --format, write a fine-tuning set for mlx_lm.lora from the successful rows instead.
    """
    from mlxbatch.jobs import provenance
    from mlxbatch.jobs.runner import export_outputs
    from mlxbatch.jobs.store import Store

    if dataset_format is None and (split or max_length or drop_truncated):
        raise click.UsageError("--split, --max-length and --drop-truncated need --format")
    db = Store(_store_for(output, store), create=False)
    try:
        run = db.last_run()
        if run is None:
            raise click.ClickException(f"{db.path}: the store holds no run yet")
        if dataset_format is not None:
            out_dir = target or "data"
            _export_dataset(db, run, out_dir, dataset_format, split, max_length, drop_truncated)
            return
        spec = JobSpec(input=run["input"], output=target or output, model=run["model"])
        n = export_outputs(db, spec, run["kind"])
        manifest = provenance.for_export(run, spec.output_path, n)
        provenance.write_manifest(provenance.manifest_path(spec.output_path), manifest)
    finally:
        db.close()
    click.echo(f"wrote {n} lines to {spec.output_path}")


def _export_dataset(
    db: Any,
    run: dict,
    out_dir: str,
    fmt: str,
    split: str | None,
    max_length: int | None,
    drop_truncated: bool,
) -> None:
    from mlxbatch.jobs import datasets

    try:
        fractions = datasets.parse_split(split or "0.9,0.05,0.05")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--split'") from None
    try:
        report = datasets.publish(db, run, out_dir, fmt, fractions, max_length, drop_truncated)
    except datasets.DatasetError as e:
        raise click.ClickException(str(e)) from None
    click.echo(datasets.report_line(report))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def doctor(as_json: bool) -> None:
    """Check the MLX install: versions, device, memory, speed settings, and the BLAS in use."""
    from mlxbatch.pipeline.engine import describe_runtime

    report = describe_runtime()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for key in ("python", "platform", "mlx", "mlx-lm", "llguidance", "device"):
        click.echo(f"{key}: {report[key]}")
    info = report["device_info"]
    memory = info.get("memory_size") or info.get("total_memory")
    if memory:
        click.echo(f"device memory: {int(memory) / 2**30:.1f} GiB")
    settings = report["settings"]
    click.echo(f"settings: {' '.join(f'{k}={v}' for k, v in settings.items()) or 'none'}")
    if "blas" in report and "cpu" in report["device"].lower():
        if report["openblas"]:
            click.echo("blas: OpenBLAS (fast float32 matmul on CPU)")
        else:
            click.echo(f"blas: {', '.join(report['blas']) or 'reference'} (slow)")
            click.echo(f"advice: {OPENBLAS_ADVICE}")


OPENBLAS_ADVICE = (
    "MLX runs on the reference BLAS; float32 matmul is ~28x faster with OpenBLAS: "
    "apt-get install libopenblas0-pthread, then "
    "export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
)


def main() -> None:
    cli(prog_name="mlxbatch")


if __name__ == "__main__":
    main()
