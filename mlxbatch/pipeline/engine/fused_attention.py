"""One decode step's attention as one CUDA kernel per layer: padded rows, an optional shared prefix.

A decode step is bound by the host, not the device: MLX encodes each of its ~700 kernels, and
the attention's ~11 per layer (scale, score matmuls, mask, concatenation, softmax, copies) took
~8 of a ~14 ms step (H200, 512 labelling rows, 24 layers; benchmarks/decode_step.py). Here one
block of four warps takes one row and one KV head. Each warp scores its own share of the keys,
32 at a time (one key per lane, read 16 bytes at a go), keeps its own running softmax in
float32, and sums the values (each lane a slice of the head's dimensions); the four partial
results are merged at the end. Keys are the prefix's (held once for the batch) followed by the
row's own, masked by the step's padding mask and read from the cache's whole buffer, so no
slice is copied.

It covers decode steps of models whose head size is 64 or 128 with up to 8 query heads per KV
head, for rows of up to MAX_KEYS keys (a long shared prefix is read once per batch by
attention.py's matmuls, once per row here), on CUDA; everything else stays with attention.py.
It does not run on Metal or the CPU.
"""

from __future__ import annotations

import functools
from typing import Any

THREADS = 128  # per block: four warps
MAX_GROUP = 8  # query heads per KV head the kernel's registers and shared memory allow
# A block walks every key of its row, prefix included; the matmuls read a held-once prefix
# once per batch. H200 decode steps (results 2026-12-01g-h200/min-blocks.txt): the kernel won
# behind 1,550 keys (16-512 rows) and lost behind 16,000 (24.6-25.4 against 8.3-12.0 ms at
# 16-32 rows). Rows of more keys keep the matmuls; ~1,700-16,000 keys were not measured.
MAX_KEYS = 2048

_HEADER = """
// Eight elements from 16-byte-aligned memory, as floats: one 16-byte load for 2-byte types.
template <typename U>
__device__ inline void load8(const U* p, float* x) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const U* r = reinterpret_cast<const U*>(&raw);
    #pragma unroll
    for (int i = 0; i < 8; i++) x[i] = static_cast<float>(r[i]);
}

__device__ inline void load8(const float* p, float* x) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}
"""

_SOURCE = """
    constexpr int NT = 128;
    constexpr int NW = NT / 32;
    constexpr int DL = D / 32;  // dimensions per lane in the value sums
    constexpr int GP = (G + 3) / 4 * 4;
    const float NEG_INF = __int_as_float(0xff800000);
    __shared__ __align__(16) float qs[G * D];
    __shared__ __align__(16) float ps[NW][32][GP];
    __shared__ float wm[NW][G];
    __shared__ float wl[NW][G];
    __shared__ float wacc[NW][G][D];

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
        qs[i] = static_cast<float>(q[((size_t)b * KV + h) * G * D + i]) * sc;
    }
    const T* pk_h = pk + (size_t)h * L * D;
    const T* pv_h = pv + (size_t)h * L * D;
    const T* k_bh = k + ((size_t)b * KV + h) * (size_t)C * D;
    const T* v_bh = v + ((size_t)b * KV + h) * (size_t)C * D;
    const bool* mask_b = mask + (size_t)b * idx;
    float m[G], l[G], acc[G][DL];
    #pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
        #pragma unroll
        for (int i = 0; i < DL; i++) acc[g][i] = 0.0f;
    }
    __syncthreads();

    for (int base = warp * 32; base < total; base += NT) {
        // Scores: one key per lane against every query head of this KV head.
        const int j = base + lane;
        const T* kr = nullptr;
        if (j < L) {
            kr = pk_h + (size_t)j * D;
        } else if (j < total && mask_b[j - L]) {
            kr = k_bh + (size_t)(j - L) * D;
        }
        float s[G];
        #pragma unroll
        for (int g = 0; g < G; g++) s[g] = kr != nullptr ? 0.0f : NEG_INF;
        if (kr != nullptr) {
            #pragma unroll
            for (int e = 0; e < D; e += 8) {
                float x[8];
                load8(kr + e, x);
                #pragma unroll
                for (int g = 0; g < G; g++) {
                    const float4 a = *reinterpret_cast<const float4*>(&qs[g * D + e]);
                    const float4 c = *reinterpret_cast<const float4*>(&qs[g * D + e + 4]);
                    s[g] += a.x * x[0] + a.y * x[1] + a.z * x[2] + a.w * x[3]
                          + c.x * x[4] + c.y * x[5] + c.z * x[6] + c.w * x[7];
                }
            }
        }
        // The warp's running softmax: a maximum shared by its lanes, sums kept per lane.
        #pragma unroll
        for (int g = 0; g < G; g++) {
            float top = s[g];
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, off));
            }
            const float m_new = fmaxf(m[g], top);
            const float p = s[g] == NEG_INF ? 0.0f : expf(s[g] - m_new);
            const float f = m[g] == NEG_INF ? 0.0f : expf(m[g] - m_new);
            m[g] = m_new;
            l[g] = l[g] * f + p;
            ps[warp][lane][g] = p;
            #pragma unroll
            for (int i = 0; i < DL; i++) acc[g][i] *= f;
        }
        __syncwarp();
        // Values: each lane sums its DL dimensions over the warp's 32 keys, eight keys' values
        // loaded before they are used (a load a key waited out the cache's latency each time).
        // Keys past the end read the last one's values: their weights are 0.
        #pragma unroll
        for (int c0 = 0; c0 < 32; c0 += 8) {
            float x[8][DL];
            #pragma unroll
            for (int u = 0; u < 8; u++) {
                const int jj = min(base + c0 + u, total - 1);
                const T* vr = (jj < L ? pv_h + (size_t)jj * D : v_bh + (size_t)(jj - L) * D)
                    + lane * DL;
                #pragma unroll
                for (int i = 0; i < DL; i++) x[u][i] = static_cast<float>(vr[i]);
            }
            #pragma unroll
            for (int u = 0; u < 8; u++) {
                float pc[GP];
                #pragma unroll
                for (int g = 0; g < GP; g += 4) {
                    *reinterpret_cast<float4*>(&pc[g]) =
                        *reinterpret_cast<const float4*>(&ps[warp][c0 + u][g]);
                }
                #pragma unroll
                for (int g = 0; g < G; g++) {
                    #pragma unroll
                    for (int i = 0; i < DL; i++) acc[g][i] += pc[g] * x[u][i];
                }
            }
        }
        __syncwarp();
    }

    // Merge the four warps' partial softmaxes.
    #pragma unroll
    for (int g = 0; g < G; g++) {
        float sum = l[g];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
        if (lane == 0) {
            wm[warp][g] = m[g];
            wl[warp][g] = sum;
        }
        #pragma unroll
        for (int i = 0; i < DL; i++) wacc[warp][g][lane * DL + i] = acc[g][i];
    }
    __syncthreads();
    for (int i = t; i < G * D; i += NT) {
        const int g = i / D;
        const int d = i % D;
        float top = NEG_INF;
        for (int w = 0; w < NW; w++) top = fmaxf(top, wm[w][g]);
        float num = 0.0f, den = 0.0f;
        for (int w = 0; w < NW; w++) {
            if (wm[w][g] == NEG_INF) continue;
            const float f = expf(wm[w][g] - top);
            num += wacc[w][g][d] * f;
            den += wl[w][g] * f;
        }
        out[((size_t)b * KV + h) * G * D + i] = static_cast<T>(num / den);
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
        header=_HEADER,
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
    over the cache's own keys, plain (unquantized) keys of a supported shape and dtype, and
    rows of at most MAX_KEYS keys with their shared prefix."""
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
        and idx + prefix_length <= MAX_KEYS
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
