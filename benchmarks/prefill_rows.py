"""`python -m benchmarks.prefill_rows`: prefill time of rows after a shared prefix, by how much
padding a batch of them may carry (`prefix.MAX_PADDING`).

What it does: renders the labelling workload with mlxbatch's own path, prefills its shared
prefix once, then times `prefix.prefill_rows` over every row for each padding limit given
(each limit warmed up once first, since MLX compiles kernels for new shapes), and prints the
number of batches, padded tokens and the median of `--repeat` timings. A limit of 1e9 is one
batch padded to the longest row, as mlx-lm prefills them.

What it does not do: decode, store or export (benchmarks.timeline times a whole run).
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.models import BENCH_DIR, bench_model
from benchmarks.run import _token_counter
from benchmarks.workloads import make_workload


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill_rows", description=__doc__)
    p.add_argument("--model-shape", help="default: tiny on CPU, qwen05b on GPU")
    p.add_argument("--rows", type=int)
    p.add_argument("--limits", default="0.06,0.125,0.25,0.5,1e9")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    import mlx.core as mx

    from benchmarks.contenders import peer_inputs
    from mlxbatch.pipeline import plan
    from mlxbatch.pipeline.engine import Engine
    from mlxbatch.pipeline.engine import prefix as prefix_module

    gpu = mx.default_device() == mx.gpu
    model = bench_model(None, args.model_shape, gpu)
    wl = make_workload(
        "labelling",
        BENCH_DIR / "data",
        rows=args.rows,
        max_tokens=None,
        count_tokens=_token_counter(model),
        default_rows=512 if gpu else 64,
    )
    engine = Engine(model)
    prompts = sorted(peer_inputs(wl, model, engine.tokenizer).prompts, key=len)
    shared = len(prompts[0])
    for ids in prompts[1:]:
        shared = min(shared, plan._common_length(prompts[0], ids))
    shared = min(shared, min(len(p) for p in prompts) - 1)
    [cache] = engine.prefill_prefixes([prompts[0][:shared]])
    suffixes = [p[shared:-1] for p in prompts]
    real = sum(len(s) for s in suffixes)
    step = engine.prefill_tokens_per_step
    print(f"{len(prompts)} rows after a {shared}-token prefix, {real} tokens to prefill, "
          f"up to {step} tokens a step")  # fmt: skip
    for limit in (float(x) for x in args.limits.split(",")):
        prefix_module.MAX_PADDING = limit
        batches = list(prefix_module._batches([len(s) for s in suffixes], step, limit))
        padded = sum(len(b) * max(len(suffixes[i]) for i in b) for b in batches)
        timings = []
        for _ in range(args.repeat + 1):  # the first run compiles this limit's shapes
            mx.synchronize()
            t0 = time.perf_counter()
            engine.prefill_rows(cache, suffixes)
            mx.synchronize()
            timings.append(time.perf_counter() - t0)
            mx.clear_cache()
        median = statistics.median(timings[1:])
        print(f"  max padding {limit:<8g} {len(batches):>3} batches {padded / real:6.2f}x tokens "
              f" median {median:.3f} s  (first {timings[0]:.3f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
