"""`python -m benchmarks.prefill_rows`: prefill time of rows after a shared prefix, by how much
padding a batch of them may carry (`prefix.MAX_PADDING`) and how many tokens one pass takes.

What it does: renders the labelling workload with mlxbatch's own path, prefills its shared
prefix once, then times `prefix.prefill_rows` over every row for each padding limit and each
`--tokens-per-pass` given (each setting warmed up once first, since MLX compiles kernels for
new shapes), and prints the number of batches, padded tokens, the median of `--repeat`
timings and the highest peak of MLX memory they added. A limit of 1e9 is one batch padded to
the longest row, as mlx-lm prefills them.

What it does not do: decode, store or export (benchmarks.timeline times a whole run).
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.workloads import add_workload_options, workload_for


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill_rows", description=__doc__)
    add_workload_options(p)
    p.add_argument("--limits", default="0.06,0.125,0.25,0.5,1e9")
    p.add_argument("--tokens-per-pass", help="comma-separated; default: what a run would use")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    import mlx.core as mx

    from benchmarks.contenders import peer_inputs
    from mlxbatch.pipeline import plan
    from mlxbatch.pipeline.engine import Engine
    from mlxbatch.pipeline.engine import prefix as prefix_module

    model, wl = workload_for(args)
    engine = Engine(model)
    prompts = sorted(peer_inputs(wl, model, engine.tokenizer).prompts, key=len)
    shared = len(prompts[0])
    for ids in prompts[1:]:
        shared = min(shared, plan._common_length(prompts[0], ids))
    shared = min(shared, min(len(p) for p in prompts) - 1)
    [cache] = engine.prefill_prefixes([prompts[0][:shared]])
    suffixes = [p[shared:-1] for p in prompts]
    real = sum(len(s) for s in suffixes)
    steps = [int(x) for x in (args.tokens_per_pass or "").split(",") if x]
    steps = steps or [engine.prefill_tokens_per_step]
    print(f"{len(prompts)} rows after a {shared}-token prefix, {real} tokens to prefill")
    for step in steps:
        for limit in (float(x) for x in args.limits.split(",")):
            prefix_module.MAX_PADDING = limit
            batches = list(prefix_module._batches([len(s) for s in suffixes], step, limit))
            padded = sum(len(b) * max(len(suffixes[i]) for i in b) for b in batches)
            timings, peak = [], 0
            for _ in range(args.repeat + 1):  # the first run compiles this setting's shapes
                mx.synchronize()
                mx.reset_peak_memory()
                held = mx.get_active_memory()
                t0 = time.perf_counter()
                prefix_module.prefill_rows(engine.model, cache, suffixes, tokens_per_step=step)
                mx.synchronize()
                timings.append(time.perf_counter() - t0)
                peak = max(peak, mx.get_peak_memory() - held)
                mx.clear_cache()
            median = statistics.median(timings[1:])
            print(f"  {step:>6} tokens a pass, max padding {limit:<8g} {len(batches):>3} batches "
                  f"{padded / real:6.2f}x tokens  median {median:.3f} s  (first "
                  f"{timings[0]:.3f} s)  peak +{peak / 2**20:,.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
