"""CUDA source of the decode-attention kernels that fused_attention.py launches.

One block of four warps takes one row, one KV head and one share of the keys (all of them
unless the step splits its keys). Each warp scores its own keys, 32 at a time (one key per
lane, read 16 bytes at a go), keeps its own running softmax in float32, and sums the values
(each lane a slice of the head's dimensions); the four partial results are merged at the end.
Keys are the prefix's (held once for the batch) followed by the row's own, masked by the
step's padding mask and read from the cache's whole buffer, so no slice is copied.

A block that has all of its row's keys writes the attention itself (`attention_kernel`). With
keys split S ways, each block writes its share's unnormalized sums and maximum
(`partial_attention_kernel`), and `combine_kernel` merges the S shares of every row and head.
This file holds the source and builds the kernels; choosing and launching them is
fused_attention.py's.
"""

from __future__ import annotations

import functools
from typing import Any

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

_WALK = """
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
    const int bh = blockIdx.x / S;  // (row, KV head)
    const int split = blockIdx.x % S;
    const int b = bh / KV;
    const int h = bh % KV;
    const int idx = meta[0];
    const int L = meta[1];
    const int C = meta[2];
    const int total = L + idx;
    // This block's keys: [lo, hi), whole warps' worth except at the end.
    const int per = (total + S * 32 - 1) / (S * 32) * 32;
    const int lo = split * per;
    const int hi = min(total, lo + per);
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

    for (int base = lo + warp * 32; base < hi; base += NT) {
        // Scores: one key per lane against every query head of this KV head.
        const int j = base + lane;
        const T* kr = nullptr;
        if (j < hi) {
            if (j < L) {
                kr = pk_h + (size_t)j * D;
            } else if (mask_b[j - L]) {
                kr = k_bh + (size_t)(j - L) * D;
            }
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
        // Keys past the block's last read its values: their weights are 0.
        #pragma unroll
        for (int c0 = 0; c0 < 32; c0 += 8) {
            float x[8][DL];
            #pragma unroll
            for (int u = 0; u < 8; u++) {
                const int jj = min(base + c0 + u, hi - 1);
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
"""

# The four warps' partial softmaxes merged: for each query head g and dimension d, the
# block's maximum `top`, weighted value sum `num` and weight sum `den`; then WRITE.
_MERGED = """
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
        WRITE
    }
"""
# All of the row's keys: the attention itself.
_NORMALIZED = _MERGED.replace("WRITE", "out[(size_t)bh * G * D + i] = static_cast<T>(num / den);")
# One share of the keys: its sums and maximum, for combine_kernel. A share with no key to see
# (all padding) leaves maximum -inf and sums 0.
_PARTIAL = _MERGED.replace(
    "WRITE",
    """const size_t at = (size_t)bh * S + split;
        pacc[at * G * D + i] = num;
        if (d == 0) {
            pm[at * G + g] = top;
            pl[at * G + g] = den;
        }""",
)

# One thread per output element (row, query head, dimension): its S shares merged.
_COMBINE = """
    const float NEG_INF = __int_as_float(0xff800000);
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t bh = i / (G * D);
    const int g = (i % (G * D)) / D;
    float top = NEG_INF;
    for (int s = 0; s < S; s++) top = fmaxf(top, pm[(bh * S + s) * G + g]);
    float num = 0.0f, den = 0.0f;
    for (int s = 0; s < S; s++) {
        const float m = pm[(bh * S + s) * G + g];
        if (m == NEG_INF) continue;
        const float f = expf(m - top);
        num += pacc[(bh * S + s) * G * D + i % (G * D)] * f;
        den += pl[(bh * S + s) * G + g] * f;
    }
    out[i] = static_cast<T>(num / den);
"""

_INPUTS = ["q", "k", "v", "pk", "pv", "mask", "meta", "scale"]


@functools.cache
def attention_kernel() -> Any:
    """Inputs `_INPUTS`, output `out` [rows, heads, 1, dim]; template T, G, D, KV, S=1."""
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name="mlxbatch_decode_attention",
        input_names=_INPUTS,
        output_names=["out"],
        source=_WALK + _NORMALIZED,
        header=_HEADER,
    )


@functools.cache
def partial_attention_kernel() -> Any:
    """Inputs `_INPUTS`; outputs, float32: `pm`, `pl` [rows, KV, S, G] (maximum, sum of
    weights), `pacc` [rows, KV, S, G, dim] (weighted values); template T, G, D, KV, S."""
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name="mlxbatch_decode_attention_split",
        input_names=_INPUTS,
        output_names=["pm", "pl", "pacc"],
        source=_WALK + _PARTIAL,
        header=_HEADER,
    )


@functools.cache
def combine_kernel() -> Any:
    """Inputs `pm`, `pl`, `pacc` as the partial kernel writes them; output `out` [rows,
    heads, 1, dim]; template T, G, D, S. One thread per output element."""
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name="mlxbatch_decode_attention_combine",
        input_names=["pm", "pl", "pacc"],
        output_names=["out"],
        source=_COMBINE,
    )
