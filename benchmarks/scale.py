"""Scale check: wall time and peak memory of `mlxbatch process` against the number of rows.

Runs the real CLI in a subprocess over generated files of short prompts (1 new token, the tiny
model) for each row count, then a resume: the first 90% of the rows are done, the file grows to
100%, and the time until generation starts is measured. Prints a table; writes JSON with
`--json`. It does not compare with peers (see run.py for that).

    python -m benchmarks.scale --rows 10000,100000 [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.models import model_dir

SUMMARY = re.compile(r"([\d.]+) tok/s; ([\d.]+) s;")


def write_rows(path: Path, start: int, stop: int, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for i in range(start, stop):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"row {i} says hello"}) + "\n")


def run_cli(inp: Path, model: str, window: int) -> dict:
    cmd = [sys.executable, "-m", "mlxbatch", "process", str(inp), "-m", model, "--max-tokens", "1",
           "--window", str(window)]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = done.stderr.strip().splitlines()[-1]
    generate = _generate_seconds(inp)
    return {"wall_s": wall, "peak_rss_mib": max(peak, before) / 1024, "summary": summary,
            "generate_s": generate}  # fmt: skip


def _generate_seconds(inp: Path) -> float:
    out = json.loads(
        subprocess.run(
            [sys.executable, "-m", "mlxbatch", "status", str(inp.with_suffix(".out.jsonl")),
             "--json"], capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    return float(out["last_run"]["stats"].get("generate_seconds", 0.0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="10000,100000", help="comma-separated row counts")
    p.add_argument("--model", help="model directory (default: the benchmark's tiny model)")
    p.add_argument("--window", type=int, default=10_000)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    model = args.model or str(model_dir("tiny"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.rows.split(",")]:
            inp = Path(tmp) / f"rows-{n}.jsonl"
            write_rows(inp, 0, n)
            full = run_cli(inp, model, args.window)
            # Resume: 90% done, the file grows to 100%: time before generation starts.
            inp90 = Path(tmp) / f"grow-{n}.jsonl"
            write_rows(inp90, 0, n * 9 // 10)
            run_cli(inp90, model, args.window)
            write_rows(inp90, n * 9 // 10, n, mode="a")
            grown = run_cli(inp90, model, args.window)
            results.append({"rows": n, "full": full, "resume_90": grown})
            line = (
                f"{n:>9,} rows: {full['wall_s']:7.1f} s wall, peak RSS "
                f"{full['peak_rss_mib']:6.0f} MiB | resume at 90%: {grown['wall_s']:6.1f} s "
                f"wall, of which generating {grown['generate_s']:5.1f} s"
            )
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
