"""Scale check: wall time, peak memory and resume start-up of `mlxbatch process` against rows.

For each row count it writes a file of short prompts and runs the real CLI in a subprocess
(the tiny model, 1 new token). The run is killed with SIGKILL once 90% of the rows are in the
store, the state a crashed nightly job leaves; a second run then resumes it. Reported per row
count: seconds to reach 90% (linear in rows if all is well), peak RSS of each run, and how long
the resumed run took before generating again (the run's own `first_generation_after`: input
check, model load, finding what is done). Then 1% more lines are appended to the finished
file and run, as a nightly job would: how long before it generates is reported too. Prints a
table; writes JSON with `--json`. It does not compare with peers (see run.py for that).

    python -m benchmarks.scale --rows 10000,100000,1000000 [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.models import model_dir


def write_rows(path: Path, n: int, start: int = 0) -> None:
    """Rows `start` to `start + n` of the short prompts, appended to `path` past the first."""
    with open(path, "a" if start else "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"row {i} says hello"}) + "\n")


def stored_results(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.Error:  # not created yet
        return 0


def run_cli(inp: Path, model: str, window: int, kill_at: int | None = None) -> dict:
    """One `mlxbatch process` run; SIGKILLed once `kill_at` results are stored, if given."""
    cmd = [sys.executable, "-m", "mlxbatch", "process", str(inp), "-m", model, "--max-tokens", "1",
           "--window", str(window), "-q"]  # fmt: skip
    store = Path(f"{inp.with_suffix('.out.jsonl')}.mlxbatch.sqlite")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = False
    # Reaped here, not by Popen, for its resource usage: a run may end before `kill_at`.
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if kill_at is not None else 0)
        if pid:
            break
        if kill_at is not None and stored_results(store) >= kill_at:
            # os.kill, not proc.send_signal: that polls, reaping a run that just ended itself.
            os.kill(proc.pid, signal.SIGKILL)  # a run that ended is a zombie until wait4
            _, status, usage = os.wait4(proc.pid, 0)
            killed = os.WIFSIGNALED(status)
            break
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read() if proc.stderr else ""
    if not killed and status != 0:
        raise SystemExit(f"mlxbatch failed: {stderr}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "killed": killed,
            "results": stored_results(store)}  # fmt: skip


def last_run_stats(inp: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "mlxbatch", "status", str(inp.with_suffix(".out.jsonl")), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)["last_run"]["stats"]


def _after(stats: dict) -> str:
    """A run's first_generation_after, or '-' when it had nothing to generate."""
    seconds = stats.get("first_generation_after")
    return f"{seconds:5.1f} s" if seconds is not None else "    -  "


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="10000,100000", help="comma-separated row counts")
    p.add_argument("--model", help="model directory (default: the benchmark's tiny model)")
    p.add_argument("--window", type=int, default=10_000)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    model = args.model or str(model_dir("tiny"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.rows.split(",")]:
            inp = Path(tmp) / f"rows-{n}.jsonl"
            write_rows(inp, n)
            crashed = run_cli(inp, model, args.window, kill_at=n * 9 // 10)
            resumed = run_cli(inp, model, args.window)
            stats = last_run_stats(inp)
            write_rows(inp, max(1, n // 100), start=n)
            nightly = run_cli(inp, model, args.window)
            nightly_stats = last_run_stats(inp)
            results.append({"rows": n, "to_90_percent": crashed, "resume": resumed,
                            "resume_stats": stats, "nightly": nightly,
                            "nightly_stats": nightly_stats})  # fmt: skip
            print(
                f"{n:>9,} rows: 90% stored after {crashed['wall_s']:7.1f} s "
                f"({crashed['results']:,} rows, peak RSS {crashed['peak_rss_mib']:5.0f} MiB) | "
                f"resume: generating after {_after(stats)}, done in "
                f"{resumed['wall_s']:6.1f} s, peak RSS {resumed['peak_rss_mib']:5.0f} MiB | "
                f"1% appended: generating after {_after(nightly_stats)}, "
                f"done in {nightly['wall_s']:6.1f} s",
                flush=True,
            )
            for f in Path(tmp).iterdir():  # free the disk before the next size
                f.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
