"""`python -m benchmarks.timeline`: where one mlxbatch run's wall time goes, phase by phase.

What it does: builds or reuses the benchmark model and workload (as benchmarks.run does), runs
mlxbatch once to warm up, then once more with the pipeline's stage functions wrapped in timers
that synchronize the device when the stage returns, so GPU work is charged to the stage that
queued it. Prints each stage's calls, seconds and peak MLX memory (indented: parts of the
stage above), what is left of the wall clock, and the time Python's garbage collector took.
`--trace` times the stages without synchronizing and prints when each first started and last
ended: the critical path of an untimed run (the loader's thread beside the main thread's).
`--clear-cache` empties MLX's buffer cache before each timed run, as benchmarks.run does, so
the run allocates afresh as a new process would. `--set MODULE.NAME=VALUE`
changes a tuning constant for an A/B run; `--profile` adds one untimed run under pyinstrument
(when installed) and prints where the host's time went.

What it does not do: compare contenders (benchmarks.run) or time anything it does not wrap;
the synchronizing timers make the run itself a little slower than an untimed one.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import gc
import importlib
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.models import BENCH_DIR, bench_model
from benchmarks.run import _token_counter
from benchmarks.workloads import WORKLOADS, make_workload, write_subset

GIB = 1 << 30

# (module, attribute path, label): stages in the order they first run.
STAGES = (
    ("mlxbatch.jobs.runner", "check_inputs", "check inputs"),
    ("mlxbatch.jobs.runner", "open_store", "open store"),
    ("mlxbatch.pipeline.engine.model", "Engine.__init__", "load model"),
    # On the loader's thread, while the main thread goes on (not part of the wall's sum).
    ("mlxbatch.pipeline.engine.load", "WeightsLoader._build", "  build (worker)"),
    ("mlxbatch.pipeline.engine.load", "WeightsLoader._read_weights", "  read weights (worker)"),
    ("mlxbatch.pipeline.engine.load", "WeightsLoader.wait_built", "  wait for build"),
    ("mlxbatch.jobs.provenance", "start", "provenance"),
    ("mlxbatch.jobs.store", "Store.begin_run", "begin run"),
    ("mlxbatch.jobs.windows", "render_tasks", "render + tokenize"),
    ("mlxbatch.jobs.store", "Store.add_manifest", "manifest"),
    ("mlxbatch.jobs.runner", "_pending", "store lookups"),
    ("mlxbatch.jobs.runner", "generate_window", "generate window"),
    ("mlxbatch.pipeline.plan", "group_by_prefix", "  group by prefix"),
    ("mlxbatch.pipeline.engine.model", "Engine.memory_budget", "  memory budget"),
    ("mlxbatch.pipeline.engine.load", "WeightsLoader.model", "  wait for weights"),
    ("mlxbatch.pipeline.engine.model", "Engine.prefill_prefixes", "  prefill prefixes"),
    ("mlxbatch.pipeline.engine.prefix", "prefill_rows", "  prefill rows"),
    ("mlxbatch.pipeline.engine.batch", "BatchRun.__init__", "  batch setup"),
    ("mlx_lm.generate", "PromptProcessingBatch.prompt", "  prefill (mlx-lm)"),
    ("mlx_lm.generate", "GenerationBatch.__init__", "  first-token pass"),
    ("mlx_lm.generate", "GenerationBatch.next", "  decode steps"),
    ("mlxbatch.pipeline.engine.batch", "BatchRun._finish", "  finish rows"),
    ("mlxbatch.jobs.store", "Store.put_results", "store results"),
    ("mlxbatch.jobs.store", "Store.record_done", "record done"),
    ("mlxbatch.jobs.provenance", "finish", "provenance"),
    ("mlxbatch.jobs.store", "Store.end_run", "end run"),
    ("mlxbatch.jobs.runner", "export_outputs", "export"),
)


class StagePeaks:
    """Peak MLX memory per stage of the main thread. MLX keeps one peak counter, so it is read
    and reset at every stage boundary, and each reading is credited to every stage then open
    (a stage's parents included). Memory the loader's threads allocate meanwhile counts for
    the main thread's open stage."""

    def __init__(self) -> None:
        self.open: list[str] = []
        self.peaks: dict[str, int] = {}
        self.run = 0

    def _credit(self) -> None:
        import mlx.core as mx

        # After a reset the counter reads 0 until the next allocation: what is held counts too.
        peak = max(mx.get_peak_memory(), mx.get_active_memory())
        mx.reset_peak_memory()
        self.run = max(self.run, peak)
        for label in self.open:
            self.peaks[label] = max(self.peaks.get(label, 0), peak)

    def enter(self, label: str) -> None:
        self._credit()
        self.open.append(label)

    def leave(self, label: str) -> None:
        self._credit()
        self.open.remove(label)

    def close(self) -> None:
        """The last reading: what came after the last stage."""
        self._credit()


@contextlib.contextmanager
def timed_stages(peaks: StagePeaks | None, sync: bool = True) -> Iterator[dict[str, list[float]]]:
    """Wrap every stage in STAGES with a timer, synchronizing the device as the stage returns
    unless `sync` is off; yields label -> [calls, seconds, first start, last end]."""
    import mlx.core as mx

    totals: dict[str, list[float]] = {label: [0, 0.0, 0.0, 0.0] for _, _, label in STAGES}
    undo = []
    for module_name, path, label in STAGES:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        original = getattr(owner, name)

        def wrapper(*args: Any, __f: Any = original, __label: str = label, **kw: Any) -> Any:
            # Windows are rendered on a worker thread of their own (jobs/windows.read_ahead),
            # which has no MLX stream to synchronize; the loader's threads have theirs.
            on_main = threading.current_thread() is threading.main_thread()
            main = peaks is not None and on_main and "(worker)" not in __label
            if main:
                peaks.enter(__label)
            t0 = time.perf_counter()
            try:
                return __f(*args, **kw)
            finally:
                if sync and (on_main or "(worker)" in __label):
                    mx.synchronize()
                t1, total = time.perf_counter(), totals[__label]
                if not total[0]:
                    total[2] = t0
                total[0] += 1
                total[1] += t1 - t0
                total[3] = t1
                if main:
                    peaks.leave(__label)

        setattr(owner, name, functools.wraps(original)(wrapper))
        undo.append((owner, name, original))
    try:
        yield totals
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def print_trace(totals: dict[str, list[float]], t0: float) -> None:
    """Each stage's first start and last end in the run, in the order they started."""
    spans = sorted((start, end, label, int(n)) for label, (n, _, start, end) in totals.items() if n)
    for start, end, label, calls in spans:
        print(f"  {label.strip():<22} {start - t0:7.3f} -> {end - t0:7.3f} s  ({calls} calls)")


@contextlib.contextmanager
def collector_time() -> Iterator[list[float]]:
    """Yields [collections, seconds] of Python's garbage collector while the block runs."""
    totals = [0.0, 0.0]
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            totals[0] += 1
            totals[1] += time.perf_counter() - started[0]

    gc.callbacks.append(callback)
    try:
        yield totals
    finally:
        gc.callbacks.remove(callback)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.timeline", description=__doc__)
    p.add_argument("--workload", choices=WORKLOADS, default="labelling")
    p.add_argument("--model-shape", help="default: tiny on CPU, qwen05b on GPU")
    p.add_argument("--model", help="a model directory instead of a benchmark shape")
    p.add_argument("--rows", type=int)
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="timed runs (each one printed)")
    p.add_argument("--profile", action="store_true", help="one more run under pyinstrument")
    p.add_argument(
        "--trace",
        action="store_true",
        help="no device syncs: print when each stage started and ended (the critical path)",
    )
    p.add_argument(
        "--clear-cache",
        action="store_true",
        help="empty MLX's buffer cache before each timed run (as benchmarks.run does)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE",
        help="set a module constant for this run (A/B of a tuning value), e.g. "
        "mlxbatch.pipeline.engine.prefix.MAX_PADDING=0.25",
    )
    args = p.parse_args(argv)
    for setting in args.set:
        target, value = setting.split("=", 1)
        module, name = target.rsplit(".", 1)
        setattr(importlib.import_module(module), name, ast.literal_eval(value))
    import mlx.core as mx

    from mlxbatch.jobs.runner import run_job
    from mlxbatch.jobs.spec import JobSpec

    gpu = mx.default_device() == mx.gpu
    model = bench_model(args.model, args.model_shape, gpu)
    wl = make_workload(
        args.workload,
        BENCH_DIR / "data",
        rows=args.rows,
        max_tokens=None,
        count_tokens=_token_counter(model),
        default_rows=512 if gpu else 64,
    )
    with tempfile.TemporaryDirectory(prefix="mlxbatch-timeline-") as tmp:
        common = dict(model=model, quiet=True, fresh=True, prefix_cache=not args.no_prefix_cache)
        warm_in = write_subset(wl, wl.rows if gpu else 8, Path(tmp))
        run_job(JobSpec(input=str(warm_in), output=f"{tmp}/warm.jsonl", **common,
                        **wl.spec_kwargs()))  # fmt: skip
        spec = JobSpec(input=str(wl.path), output=f"{tmp}/out.jsonl", **common,
                       **wl.spec_kwargs())  # fmt: skip
        for _ in range(args.repeat):
            gc.collect()  # as benchmarks.run does: no garbage left from the runs before
            if args.clear_cache:
                mx.clear_cache()
            mx.reset_peak_memory()
            peaks = None if args.trace else StagePeaks()
            with timed_stages(peaks, sync=not args.trace) as totals, collector_time() as collected:
                t0 = time.perf_counter()
                summary = run_job(spec)
                wall = time.perf_counter() - t0
            reuse = "off" if args.no_prefix_cache else "on"
            print(f"\n{wl.name}, prefix reuse {reuse}: wall {wall:.3f} s, {summary.ok} rows, "
                  f"{summary.generated_tokens} tokens {' '.join(args.set)}")  # fmt: skip
            if peaks is None:
                print_trace(totals, t0)
                continue
            peaks.close()
            print(f"  peak {peaks.run / GIB:.2f} GiB")
            top = 0.0
            for label, (calls, seconds, _, _) in totals.items():
                if calls:
                    peak = f"{peaks.peaks[label] / GIB:8.2f} GiB" if label in peaks.peaks else ""
                    print(f"  {label:<20} {int(calls):>6} calls {seconds:8.3f} s {peak}")
                    top += seconds if not label.startswith(" ") else 0.0
            print(f"  {'(not in a stage)':<20} {'':>12} {wall - top:8.3f} s")
            runs, seconds = collected
            print(f"  {'(garbage collector)':<20} {int(runs):>6} runs  {seconds:8.3f} s")
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            with profiler:
                run_job(spec)
            print(profiler.output_text(show_all=False, unicode=False))


if __name__ == "__main__":
    main()
