"""`python -m benchmarks.decode_step`: where a decode step's time goes, for a labelling batch.

What it does: loads the benchmark model, prefills rows behind one shared prefix the way
mlxbatch does (random token ids: by default a 1,550-token prefix and 512 rows of 100-200
tokens on GPU, as in the labelling workload), then runs greedy decode steps pipelined as
mlx-lm runs them (each step queued before the one ahead of it is read) and prints the mean
per step of: building the step's graph in Python, `mx.async_eval` (MLX encoding the step's
kernels; on CUDA it also waits while too many are in flight) and the wait for the step ahead.
`--stub-attention` makes decode attention return its queries (same shapes, wrong values): the
difference to the plain run bounds what attention costs a step. `--sync` waits for each step
before building the next, which shows the device's share.

What it does not do: sample, run mlx-lm's BatchGenerator or store anything.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from benchmarks.models import SHAPES, bench_model


def prefilled_batch(engine: Any, rows: int, prefix_tokens: int, seed: int = 0) -> tuple[Any, Any]:
    """The batch's per-layer cache after the shared prefix and every row, and the rows' last
    tokens (what the first decode step reads)."""
    import mlx.core as mx

    from mlxbatch.pipeline.engine.row_kv import merge_rows

    rng = random.Random(seed)
    vocab = min(4000, int(engine.config.get("vocab_size") or 4000))
    prefix = [rng.randrange(vocab) for _ in range(prefix_tokens)]
    suffixes = [[rng.randrange(vocab) for _ in range(rng.randint(100, 200))] for _ in range(rows)]
    [shared] = engine.prefill_prefixes([prefix])
    handles = engine.prefill_rows(shared, [s[:-1] for s in suffixes])
    cache = [merge_rows([h[k] for h in handles]) for k in range(len(shared))]
    mx.eval([c.state for c in cache])
    return cache, mx.array([s[-1] for s in suffixes])


def time_steps(model: Any, cache: Any, tokens: Any, steps: int, sync: bool) -> list[float]:
    """Mean milliseconds per step: [graph build, async_eval, wait for the step ahead]."""
    import mlx.core as mx

    from mlxbatch.pipeline.engine.attention import batch_attention

    def forward(y: Any) -> Any:
        logits = model(y[:, None], cache=cache)[:, -1, :]
        return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)

    spent = []
    with batch_attention(model):
        queued = forward(tokens)
        mx.async_eval(queued)
        for _ in range(steps):
            t0 = time.perf_counter()
            current, queued = queued, forward(queued)
            t1 = time.perf_counter()
            mx.async_eval(queued)
            t2 = time.perf_counter()
            current.tolist()
            if sync:
                mx.eval(queued)
            spent.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        mx.eval(queued)
    kept = spent[2:] or spent  # the first steps compile kernels for new shapes
    return [1e3 * sum(s[i] for s in kept) / len(kept) for i in range(3)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_step", description=__doc__)
    p.add_argument("--model-shape", choices=sorted(SHAPES), help="default: tiny on CPU, qwen05b")
    p.add_argument("--model", help="a model directory instead of a benchmark shape")
    p.add_argument("--rows", type=int, help="default: 512 on GPU, 32 on CPU")
    p.add_argument("--prefix", type=int, default=1550, help="shared prefix tokens")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeat", type=int, default=2, help="rounds of the variants")
    p.add_argument("--stub-attention", action="store_true", help="also time a stubbed attention")
    p.add_argument("--sync", action="store_true", help="wait for each step before the next")
    args = p.parse_args(argv)
    import mlx.core as mx

    from mlxbatch.pipeline.engine import Engine, attention

    gpu = mx.default_device() == mx.gpu
    path = bench_model(args.model, args.model_shape, gpu)
    engine = Engine(path)
    rows = args.rows or (512 if gpu else 32)
    real = attention.shared_prefix_attention

    def stub(queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any) -> Any:
        decode = queries.shape[2] == 1
        return queries if decode else real(queries, keys, values, cache, scale, mask)

    variants = [("attention", real)] + (
        [("stubbed attention", stub)] if args.stub_attention else []
    )
    print(f"{rows} rows behind a {args.prefix}-token prefix, {args.steps} steps, ms per step")
    for _ in range(args.repeat):
        for name, function in variants:
            attention.shared_prefix_attention = function
            try:
                cache, tokens = prefilled_batch(engine, rows, args.prefix)
                build, encode, wait = time_steps(engine.model, cache, tokens, args.steps, args.sync)
            finally:
                attention.shared_prefix_attention = real
            total = build + encode + wait
            print(f"  {name:<18} build {build:6.2f}  async_eval {encode:6.2f}  "
                  f"wait {wait:6.2f}  total {total:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
