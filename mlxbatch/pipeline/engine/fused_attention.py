"""One decode step's attention as one CUDA kernel per layer: padded rows, an optional shared prefix.

A decode step is bound by the host, not the device: MLX encodes each of its ~700 kernels, and
the attention's ~11 per layer (scale, score matmuls, mask, concatenation, softmax, copies) took
~8 of a ~14 ms step (H200, 512 labelling rows, 24 layers; benchmarks/decode_step.py). Here each
block of 128 threads takes one row and one KV head: it scores the prefix's keys (held once for
the batch) and the row's own keys (masked by the step's padding mask) against the query heads
of that KV head, with a running softmax in float32, and sums the values. The own keys are read
from the cache's whole buffer, so no slice is copied.

It covers decode steps of models whose head size is 64 or 128, on CUDA; everything else stays
with attention.py. It does not run on Metal or the CPU.
"""

from __future__ import annotations

import functools
from typing import Any

THREADS = 128  # per block, and keys per tile

_SOURCE = """
    constexpr int NT = 128;
    constexpr int W = NT / 32;
    constexpr int GSTEP = NT / D;
    constexpr int NA = (G + GSTEP - 1) / GSTEP;
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ float qs[G * D];
    __shared__ float ps[G * NT];
    __shared__ float m_s[G];
    __shared__ float l_s[G];
    __shared__ float f_s[G];

    const int t = threadIdx.x;
    const int lane = t & 31;
    const int warp = t >> 5;
    const int b = blockIdx.x / KV;
    const int h = blockIdx.x % KV;
    const int idx = meta[0];
    const int L = meta[1];
    const int C = meta[2];
    const int total = L + idx;
    const float sc = scale[0];

    for (int i = t; i < G * D; i += NT) {
        qs[i] = static_cast<float>(q[((size_t)b * KV * G + (size_t)h * G) * D + i]) * sc;
    }
    if (t < G) {
        m_s[t] = NEG_INF;
        l_s[t] = 0.0f;
    }
    const int d = t % D;
    const int g0 = t / D;
    float acc[NA];
    for (int a = 0; a < NA; a++) acc[a] = 0.0f;
    const T* pk_h = pk + (size_t)h * L * D;
    const T* pv_h = pv + (size_t)h * L * D;
    const T* k_bh = k + ((size_t)b * KV + h) * (size_t)C * D;
    const T* v_bh = v + ((size_t)b * KV + h) * (size_t)C * D;
    const bool* mask_b = mask + (size_t)b * idx;
    __syncthreads();

    for (int tile = 0; tile < total; tile += NT) {
        // Scores: one key per thread, against every query head of this KV head.
        const int j = tile + t;
        const T* kr = nullptr;
        if (j < L) {
            kr = pk_h + (size_t)j * D;
        } else if (j < total && mask_b[j - L]) {
            kr = k_bh + (size_t)(j - L) * D;
        }
        if (kr != nullptr) {
            float s[G];
            for (int g = 0; g < G; g++) s[g] = 0.0f;
            for (int e = 0; e < D; e++) {
                const float x = static_cast<float>(kr[e]);
                for (int g = 0; g < G; g++) s[g] += qs[g * D + e] * x;
            }
            for (int g = 0; g < G; g++) ps[g * NT + t] = s[g];
        } else {
            for (int g = 0; g < G; g++) ps[g * NT + t] = NEG_INF;
        }
        __syncthreads();
        // Running softmax: one warp per head.
        for (int g = warp; g < G; g += W) {
            float top = NEG_INF;
            for (int c = lane; c < NT; c += 32) top = fmaxf(top, ps[g * NT + c]);
            for (int off = 16; off > 0; off >>= 1) {
                top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, off));
            }
            const float m_old = m_s[g];
            const float m_new = fmaxf(m_old, top);
            float sum = 0.0f;
            for (int c = lane; c < NT; c += 32) {
                const float x = ps[g * NT + c];
                const float p = (x == NEG_INF) ? 0.0f : expf(x - m_new);
                ps[g * NT + c] = p;
                sum += p;
            }
            for (int off = 16; off > 0; off >>= 1) {
                sum += __shfl_xor_sync(0xffffffff, sum, off);
            }
            if (lane == 0) {
                const float f = (m_old == NEG_INF) ? 0.0f : expf(m_old - m_new);
                f_s[g] = f;
                l_s[g] = l_s[g] * f + sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();
        // Values: each thread sums one dimension for its share of the heads.
        const int count = min(NT, total - tile);
        for (int a = 0; a < NA; a++) {
            const int g = g0 + a * GSTEP;
            if (g < G) acc[a] *= f_s[g];
        }
        for (int c = 0; c < count; c++) {
            const int jj = tile + c;
            const T* vr = (jj < L) ? pv_h + (size_t)jj * D : v_bh + (size_t)(jj - L) * D;
            const float x = static_cast<float>(vr[d]);
            for (int a = 0; a < NA; a++) {
                const int g = g0 + a * GSTEP;
                if (g < G) acc[a] += ps[g * NT + c] * x;
            }
        }
        __syncthreads();
    }
    for (int a = 0; a < NA; a++) {
        const int g = g0 + a * GSTEP;
        if (g < G) {
            out[((size_t)b * KV * G + (size_t)h * G + g) * D + d] = static_cast<T>(acc[a] / l_s[g]);
        }
    }
"""


@functools.cache
def _kernel() -> Any:
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name="mlxbatch_decode_attention",
        input_names=["q", "k", "v", "pk", "pv", "mask", "meta", "scale"],
        output_names=["out"],
        source=_SOURCE,
    )


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
    over the cache's own keys, plain (unquantized) keys of a supported shape and dtype."""
    import mlx.core as mx

    b, heads, n, dim = queries.shape
    buffer = getattr(cache, "keys", None)
    idx = getattr(cache, "_idx", None)
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
        and not hasattr(cache, "bits")
        and buffer.ndim == 4
        and buffer.shape[0] == b
        and buffer.shape[2] >= idx == keys.shape[2]
        and buffer.dtype == queries.dtype
        and getattr(cache, "values", None) is not None
        and cache.values.shape[-1] == dim
        and heads % buffer.shape[1] == 0
        and heads // buffer.shape[1] <= 16
    )


def fused_decode_attention(
    queries: Any, cache: Any, scale: float, mask: Any, prefix: tuple[Any, Any] | None = None
) -> Any:
    """Attention of one decode step over `prefix` (keys, values: [1, kv_heads, length, dim],
    the same for every row) and the rows' own keys in `cache` up to `cache._idx` where `mask`
    allows. Call only where `fusable` holds."""
    b, heads, _, dim = queries.shape
    keys, values = cache.keys, cache.values
    kv_heads = keys.shape[1]
    if prefix is None:
        prefix_keys = prefix_values = _no_prefix(kv_heads, dim, queries.dtype)
        length = 0
    else:
        prefix_keys, prefix_values = prefix[0][0], prefix[1][0]
        length = prefix_keys.shape[1]
    (out,) = _kernel()(
        inputs=[
            queries,
            keys,
            values,
            prefix_keys,
            prefix_values,
            mask,
            _meta(cache._idx, length, keys.shape[2]),
            _scale(float(scale)),
        ],
        template=[("T", queries.dtype), ("G", heads // kv_heads), ("D", dim), ("KV", kv_heads)],
        grid=(b * kv_heads * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(b, heads, 1, dim)],
        output_dtypes=[queries.dtype],
    )
    return out
