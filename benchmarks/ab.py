"""`python -m benchmarks.ab`: settings of mlxbatch timed against each other, in one process.

What it does: builds or reuses the benchmark model and workload (as benchmarks.run does), warms
each variant up once, then runs mlxbatch end to end (file in, file out, store included) under
each variant in turn, round after round, the order reversed every other round, MLX's buffer
cache emptied before each run as benchmarks.run does. A variant is `NAME:SETTING,...`, where a
setting is `MODULE.NAME=VALUE` (a module constant, VALUE a Python literal), a JobSpec field
(`prefix_cache=False`) or an environment variable (`MLXBATCH_DECODE_ATTENTION=grouped`, for
settings read while a run goes); each is put back after the variant's run. Prints each
variant's walls, their median, the ratio of the first variant's median to it, how many output
rows are the same as the first variant's, and MLX's highest peak memory over its runs.

Why: runs of one setting in separate processes on one H200 differed by up to 25%
(benchmarks/results/2026-12-01f-h200/), more than most changes being measured; within one
process the spread is smaller, and alternating spreads what drift remains over the variants.

What it does not do: time peers (benchmarks.run), split a run into stages (benchmarks.timeline)
or change settings MLX reads once at start-up (run those in separate processes).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import gc
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.workloads import WORKLOADS, add_workload_options, workload_for, write_subset


@dataclasses.dataclass
class Variant:
    name: str
    constants: dict[str, Any]  # "module.NAME" -> value
    spec: dict[str, Any]  # JobSpec fields
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        """`NAME:SETTING,...` (or just NAME: the settings as they are)."""
        from mlxbatch.jobs.spec import JobSpec

        name, _, settings = text.partition(":")
        fields = {f.name for f in dataclasses.fields(JobSpec)}
        variant = cls(name, {}, {}, {})
        for setting in filter(None, settings.split(",")):
            key, sep, value = setting.partition("=")
            if not sep:
                raise SystemExit(f"variant {name!r}: {setting!r} is not KEY=VALUE")
            if "." in key:
                variant.constants[key] = ast.literal_eval(value)
            elif key in fields:
                variant.spec[key] = ast.literal_eval(value)
            else:
                variant.env[key] = value
        return variant

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The variant's constants and environment in place, put back afterwards."""
        saved: list[tuple[Any, str, Any]] = []
        for target, value in self.constants.items():
            module, name = target.rsplit(".", 1)
            owner = importlib.import_module(module)
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)
        env = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for owner, name, value in reversed(saved):
                setattr(owner, name, value)
            for key, old in env.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


def alternating(variants: list[Variant], rounds: int) -> Iterator[Variant]:
    """Every variant once a round, in reverse order every other round (A B, B A, A B, ...)."""
    for i in range(rounds):
        yield from (variants if i % 2 == 0 else variants[::-1])


def summarize(variants: list[Variant], walls: dict[str, list[float]],
              same: dict[str, list[int]], rows: int, peaks: dict[str, list[int]],
              errors: dict[str, list[int]] | None = None) -> list[str]:  # fmt: skip
    """One line per variant: median, speed against the first, agreement, MLX's highest peak
    memory over the variant's runs, the most error records a run wrote, walls in run order."""
    base = statistics.median(walls[variants[0].name])
    lines = []
    for v in variants:
        median = statistics.median(walls[v.name])
        agree = min(same[v.name], default=rows)
        peak = max(peaks[v.name], default=0) / 2**20
        failed = max((errors or {}).get(v.name, []), default=0)
        lines.append(
            f"{v.name:<12} median {median:7.3f} s  {base / median:5.2f}x  "
            f"same output rows {agree}/{rows}  peak {peak:,.0f} MiB  "
            + (f"error records {failed}  " if failed else "")
            + "runs "
            + " ".join(f"{w:.3f}" for w in walls[v.name])
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    p.add_argument("--variant", action="append", required=True, metavar="NAME:SETTING,...")
    p.add_argument("--workload", choices=WORKLOADS, default="labelling")
    p.add_argument("--rounds", type=int, default=5)
    add_workload_options(p)
    args = p.parse_args(argv)
    variants = [Variant.parse(v) for v in args.variant]
    if len({v.name for v in variants}) < len(variants):
        raise SystemExit("variant names must differ")
    import mlx.core as mx

    from mlxbatch.jobs.runner import run_job
    from mlxbatch.jobs.spec import JobSpec

    gpu = mx.default_device() == mx.gpu
    model, wl = workload_for(args, args.workload)
    walls: dict[str, list[float]] = {v.name: [] for v in variants}
    peaks: dict[str, list[int]] = {v.name: [] for v in variants}
    same: dict[str, list[int]] = {v.name: [] for v in variants}
    errors: dict[str, list[int]] = {v.name: [] for v in variants}
    first: dict[Any, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="mlxbatch-ab-") as tmp:
        common = dict(model=model, quiet=True, fresh=True, **wl.spec_kwargs())
        warm_in = str(write_subset(wl, wl.rows if gpu else 8, Path(tmp)))
        out = Path(tmp) / "out.jsonl"
        for v in variants:
            with v.applied():
                run_job(JobSpec(input=warm_in, output=f"{tmp}/warm.jsonl", **common | v.spec))
        for v in alternating(variants, args.rounds):
            with v.applied():
                gc.collect()
                mx.clear_cache()
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                summary = run_job(JobSpec(input=str(wl.path), output=str(out), **common | v.spec))
                walls[v.name].append(time.perf_counter() - t0)
                peaks[v.name].append(mx.get_peak_memory())
            if summary.status != "completed":  # e.g. SIGTERM from `timeout`: a partial output
                raise SystemExit(f"{v.name}: the run was {summary.status}")
            outputs = output_texts(out)
            first = first or outputs
            same[v.name].append(sum(outputs.get(k, object()) == t for k, t in first.items()))
            errors[v.name].append(error_records(out))
            print(f"   {v.name}: {walls[v.name][-1]:.3f} s, {len(outputs)} output rows, "
                  f"{errors[v.name][-1]} error records", file=sys.stderr, flush=True)  # fmt: skip
    print(f"{wl.name}: {wl.rows} prompts, {args.rounds} rounds, {model}")
    for line in summarize(variants, walls, same, len(first or []), peaks, errors):
        print(line)


def output_texts(out: Path) -> dict[Any, Any]:
    """Each output row's text, by its id."""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return {r.get("custom_id", r.get("id")): r.get("output") for r in rows}


def error_records(out: Path) -> int:
    """How many error records the run wrote; the first is printed."""
    from mlxbatch.jobs.spec import errors_path

    errors = Path(errors_path(str(out)))
    lines = errors.read_text(encoding="utf-8").splitlines() if errors.exists() else []
    if lines:
        print(f"   first error record: {lines[0][:300]}", file=sys.stderr)
    return len(lines)


if __name__ == "__main__":
    main()
