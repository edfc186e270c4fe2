"""`python -m benchmarks.reuse_ties`: the greedy rows that differ with and without prefix reuse,
and how close the model's top two tokens were where each pair parts.

What it does: runs the labelling workload through mlxbatch twice, prefix reuse on and off (the
same model, dtype and rows), every row asking for its top two logprobs. It prints how many rows
have the same text both ways, the median and 1st-percentile margin between the top two logprobs
over every token of the reuse run (for scale), and, for each row that differs, the first token
where the two texts part and that margin in both runs. Rows that are error records in either
run (no logprobs) are counted and left out. A margin of about one rounding step (0 or one bf16
step, 1/32 at these logprobs) says the pair parted at a near-tie of two tokens.

What it does not do: time anything (benchmarks.run does), or decide what counts as a tie.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from typing import Any

from benchmarks.workloads import add_workload_options, workload_for


def _margin(entry: dict) -> float:
    top = entry["top_logprobs"]
    return float(top[0]["logprob"] - top[1]["logprob"])


def _tokens(row: dict) -> list[dict] | None:
    """The row's per-token logprob entries; None for an error record, which has none."""
    logprobs = row.get("logprobs")
    return logprobs["content"] if row.get("error") is None and logprobs else None


def _run(workload: Any, model: str, output: str, *, dtype: str, reuse: bool) -> dict[str, dict]:
    from mlxbatch.jobs.runner import run_job
    from mlxbatch.jobs.spec import JobSpec

    spec = JobSpec(input=str(workload.path), output=output, model=model, quiet=True, dtype=dtype,
                   prefix_cache=reuse, top_logprobs=2, **workload.spec_kwargs())  # fmt: skip
    run_job(spec)
    with open(output) as f:
        return {row["id"]: row for row in map(json.loads, f)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reuse_ties", description=__doc__)
    add_workload_options(p)
    p.add_argument("--dtype", default="auto", help="auto: float32 on CPU, the checkpoint's on GPU")
    p.add_argument("--show", type=int, default=40, help="differing rows to list")
    args = p.parse_args(argv)
    model, workload = workload_for(args)
    with tempfile.TemporaryDirectory(prefix="mlxbatch-ties-") as tmp:
        on = _run(workload, model, f"{tmp}/on.jsonl", dtype=args.dtype, reuse=True)
        off = _run(workload, model, f"{tmp}/off.jsonl", dtype=args.dtype, reuse=False)
    tokens = {key: (_tokens(row), _tokens(off[key])) for key, row in on.items()}
    compared = {key: pair for key, pair in tokens.items() if None not in pair}
    failed = len(tokens) - len(compared)
    parted = []
    for key, (ours, theirs) in compared.items():
        if on[key]["output"] == off[key]["output"]:
            continue
        # Token strings, as the texts are compared: the first place the two rows part. The
        # shorter row may end first (an EOS), so the pairs stop with it.
        pairs = zip(ours, theirs, strict=False)
        first = next(
            (i for i, (a, b) in enumerate(pairs) if a["token"] != b["token"]),
            min(len(ours), len(theirs)),
        )
        parted.append((key, first, ours, theirs))
    margins = sorted(_margin(e) for ours, _ in compared.values() for e in ours or [])
    print(f"{args.dtype}: {len(compared) - len(parted)}/{len(compared)} rows the same with and "
          "without reuse")  # fmt: skip
    if failed:
        print(f"rows that are error records in one run or both (not compared): {failed}")
    if margins:
        print(f"top-2 logprob margin over all {len(margins)} tokens with reuse: median "
              f"{statistics.median(margins):.4f}, 1st percentile "
              f"{margins[len(margins) // 100]:.5f}")  # fmt: skip
    for key, first, ours, theirs in parted[: args.show]:
        if first >= min(len(ours), len(theirs)):
            print(f"  {key}: one text ends where the other goes on (token {first})")
            continue
        print(f"  {key}: first different token {first}, top-2 margin with reuse "
              f"{_margin(ours[first]):.5f}, without {_margin(theirs[first]):.5f}")  # fmt: skip


if __name__ == "__main__":
    main()
