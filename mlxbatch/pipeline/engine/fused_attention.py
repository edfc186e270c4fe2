"""One decode step's attention as one CUDA kernel per layer: padded rows, an optional shared prefix.

A decode step is bound by the host, not the device: MLX encodes each of its ~700 kernels, and
the attention's ~11 per layer (scale, score matmuls, mask, concatenation, softmax, copies) took
~8 of a ~14 ms step (H200, 512 labelling rows, 24 layers; benchmarks/decode_step.py). Here a
block of four warps takes one row and one KV head and walks its keys, the shared prefix's
(held once for the batch) and the row's own (decode_kernels.py has the source). A batch of few
rows would leave most of the device idle while each block walks a long row, so such a step
splits each row's keys into shares, one block each, and a second kernel merges the shares.

It covers decode steps of models whose head size is 64 or 128 with up to 8 query heads per KV
head, of up to MAX_ROW_KEYS keys over all rows, on CUDA; everything else stays with
attention.py. It does not run on Metal or the CPU.
"""

from __future__ import annotations

import functools
from typing import Any

from mlxbatch.pipeline.engine.decode_kernels import (
    attention_kernel,
    combine_kernel,
    partial_attention_kernel,
)

THREADS = 128  # per block: four warps
MAX_GROUP = 8  # query heads per KV head the kernel's registers and shared memory allow
# Each block walks every key of its row, a held-once prefix included, which the matmuls read
# once per batch, so the kernel takes steps of at most MAX_ROW_KEYS keys over all rows. H200
# decode steps (results 2026-12-01h-h200/split-sweep.txt; ms, kernel against matmuls): 256 rows
# x 4,000 keys 9.5-12 / 17-19, 64 x 16,000 12-13 / 17-20; 512 x 4,000 20 / 18-22; 256 x 8,000
# 20-21 / 17-18; 512 x 8,000 33 / 25.
MAX_ROW_KEYS = 1_500_000
# Keys are split while a step has fewer than TARGET_BLOCKS blocks (an H200 holds ~2,000 of
# them at once) and every share keeps MIN_SHARE keys or more.
TARGET_BLOCKS = 1024
MIN_SHARE = 256
MAX_SPLITS = 32


# Small arrays every layer of a step passes alike: made once, not once per layer.
@functools.lru_cache(maxsize=512)
def _meta(idx: int, prefix_length: int, capacity: int) -> Any:
    import mlx.core as mx

    return mx.array([idx, prefix_length, capacity], mx.int32)


@functools.lru_cache(maxsize=64)
def _scale(value: float) -> Any:
    import mlx.core as mx

    return mx.array([value], mx.float32)


@functools.lru_cache(maxsize=16)
def _no_prefix(kv_heads: int, dim: int, dtype: Any) -> Any:
    import mlx.core as mx

    return mx.zeros((kv_heads, 1, dim), dtype)


def fusable(queries: Any, keys: Any, cache: Any, mask: Any, sinks: Any = None) -> bool:
    """Whether the kernel covers this call: one decode step, a [rows, 1, 1, keys] bool mask
    over the cache's own keys, plain (unquantized) keys of a supported shape and dtype, and
    at most MAX_ROW_KEYS keys over all rows, each row's shared prefix included."""
    import mlx.core as mx

    b, heads, n, dim = queries.shape
    buffer = getattr(cache, "keys", None)
    idx = getattr(cache, "_idx", None)
    prefix = getattr(cache, "prefix", None)
    prefix_length = prefix[0].shape[2] if prefix is not None else 0
    return (
        n == 1
        and sinks is None
        and dim in (64, 128)
        and queries.dtype in (mx.bfloat16, mx.float16, mx.float32)
        and isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.shape == (b, 1, 1, keys.shape[2])
        and isinstance(idx, int)
        and buffer is not None
        and not hasattr(cache, "bits")  # quantized caches have their own attention
        and not hasattr(cache, "max_size")  # a sliding window's buffer is a ring, not in order
        and buffer.ndim == 4
        and buffer.shape[0] == b
        and buffer.shape[2] >= idx == keys.shape[2]
        and buffer.dtype == queries.dtype
        and getattr(cache, "values", None) is not None
        and cache.values.shape[-1] == dim
        and heads % buffer.shape[1] == 0
        and heads // buffer.shape[1] <= MAX_GROUP
        and b * (idx + prefix_length) <= MAX_ROW_KEYS
    )


def fused_decode_attention(
    queries: Any, cache: Any, scale: float, mask: Any, prefix: tuple[Any, Any] | None = None
) -> Any:
    """Attention of one decode step over `prefix` (keys, values: [1, kv_heads, length, dim],
    the same for every row) and the rows' own keys in `cache` up to `cache._idx` where `mask`
    allows. Call only where `fusable` holds."""
    import mlx.core as mx

    b, heads, _, dim = queries.shape
    keys, values = cache.keys, cache.values
    kv_heads = keys.shape[1]
    if prefix is None:
        prefix_keys = prefix_values = _no_prefix(kv_heads, dim, queries.dtype)
        length = 0
    else:
        prefix_keys, prefix_values = prefix[0][0], prefix[1][0]
        length = prefix_keys.shape[1]
    inputs = [
        queries,
        keys,
        values,
        prefix_keys,
        prefix_values,
        mask,
        _meta(cache._idx, length, keys.shape[2]),
        _scale(float(scale)),
    ]
    group = heads // kv_heads
    template = [("T", queries.dtype), ("G", group), ("D", dim), ("KV", kv_heads)]
    splits = key_splits(b * kv_heads, length + cache._idx)
    if splits == 1:
        (out,) = attention_kernel()(
            inputs=inputs,
            template=[*template, ("S", 1)],
            grid=(b * kv_heads * THREADS, 1, 1),
            threadgroup=(THREADS, 1, 1),
            output_shapes=[(b, heads, 1, dim)],
            output_dtypes=[queries.dtype],
        )
        return out
    shares = partial_attention_kernel()(
        inputs=inputs,
        template=[*template, ("S", splits)],
        grid=(b * kv_heads * splits * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[
            (b, kv_heads, splits, group),
            (b, kv_heads, splits, group),
            (b, kv_heads, splits, group, dim),
        ],
        output_dtypes=[mx.float32] * 3,
    )
    (out,) = combine_kernel()(
        inputs=shares,
        template=[("T", queries.dtype), ("G", group), ("D", dim), ("S", splits)],
        grid=(b * heads * dim, 1, 1),
        threadgroup=(dim, 1, 1),
        output_shapes=[(b, heads, 1, dim)],
        output_dtypes=[queries.dtype],
    )
    return out


def key_splits(blocks: int, keys: int) -> int:
    """How many ways a step splits each row's keys: doubled while the blocks stay within
    TARGET_BLOCKS and every share keeps at least MIN_SHARE keys (1: not split)."""
    splits = 1
    while (
        splits < MAX_SPLITS
        and blocks * splits * 2 <= TARGET_BLOCKS
        and keys >= splits * 2 * MIN_SHARE
    ):
        splits *= 2
    return splits
