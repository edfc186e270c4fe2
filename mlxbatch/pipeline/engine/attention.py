"""Attention for batched generation, swapped into mlx-lm's model modules while generating.

Two cases leave mlx-lm's own attention: a batch holding a shared prefix once (cache.py), whose
keys and values arrive without the prefix; and decode steps of left-padded batches. On CUDA a
decode step of either runs as one kernel per layer (fused_attention.py); elsewhere, or where
that kernel does not apply, as grouped matmuls. Everything else goes to mlx-lm's attention
unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from typing import Any

from mlxbatch.pipeline.engine.fused_attention import fusable, fused_decode_attention

# "fused", "grouped" or "mlx": decode attention of padded batches (default: fused on CUDA).
DECODE_ATTENTION_ENV = "MLXBATCH_DECODE_ATTENTION"


@contextlib.contextmanager
def batch_attention(model: Any) -> Any:
    """Route the model's attention through this module while generating.

    mlx-lm model modules call `scaled_dot_product_attention` by module-global name, so it is
    swapped there, and put back afterwards. The fused and grouped decode attentions are on by
    default on CUDA only, where they were measured.
    """
    from mlx_lm.models import base

    cuda = on_cuda()
    mode = os.environ.get(DECODE_ATTENTION_ENV) or ("fused" if cuda else "")
    fused, grouped = mode == "fused" and cuda, mode in ("fused", "grouped")
    original = base.scaled_dot_product_attention

    def attention(
        queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any, sinks: Any = None
    ) -> Any:
        if fused and fusable(queries, keys, cache, mask, sinks):
            prefix = getattr(cache, "prefix", None)
            return fused_decode_attention(queries, cache, scale, mask, prefix)
        if getattr(cache, "prefix", None) is not None and sinks is None:
            return shared_prefix_attention(queries, keys, values, cache, scale, mask)
        if grouped:
            return grouped_decode_attention(queries, keys, values, cache, scale, mask, sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    swapped = [
        m
        for m in _layer_modules(model)
        if getattr(m, "scaled_dot_product_attention", None) is original
    ]
    for module in swapped:
        module.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        for module in swapped:
            module.scaled_dot_product_attention = original


def on_cuda() -> bool:
    """Whether MLX runs on an NVIDIA GPU (its CUDA build, with the GPU the default device)."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)  # every current MLX build has it; older ones may not
    return cuda is not None and cuda.is_available() and mx.default_device() == mx.gpu


# id(model) -> (a weak reference to it, the Python modules its layers' classes come from)
_LAYER_MODULES: dict[int, tuple[Any, list[Any]]] = {}


def _layer_modules(model: Any) -> list[Any]:
    """The Python modules defining the model's layer classes, found once per model: walking
    its modules took ~4 ms, paid by every prefix group (64 in a synthetic run)."""
    known = _LAYER_MODULES.get(id(model))
    if known is None or known[0]() is not model:
        for gone in [k for k, (ref, _) in _LAYER_MODULES.items() if ref() is None]:
            del _LAYER_MODULES[gone]
        modules = list({sys.modules[type(m).__module__] for m in model.modules()})
        known = _LAYER_MODULES[id(model)] = (weakref.ref(model), modules)
    return known[1]


def shared_prefix_attention(
    queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any
) -> Any:
    """Attention over a batch's prefix, held once in `cache.prefix`, and each row's own tokens.

    A decode step scores every row against the prefix in one matmul per KV head, reading the
    prefix once for the whole batch; the rows' own tokens are scored as in
    `grouped_decode_attention`. A prefill chunk attends over the prefix broadcast to its rows
    (the prefix columns need no mask: every row sees all of it).
    """
    import mlx.core as mx

    prefix_keys, prefix_values = cache.prefix
    b, heads, n, dim = queries.shape
    length = prefix_keys.shape[2]
    if n > 1 or not isinstance(mask, mx.array):
        k = mx.concatenate([mx.broadcast_to(prefix_keys, (b, *prefix_keys.shape[1:])), keys], 2)
        v = mx.concatenate(
            [mx.broadcast_to(prefix_values, (b, *prefix_values.shape[1:])), values], 2
        )
        if isinstance(mask, mx.array):
            shape = (*mask.shape[:-1], length)
            seen = (
                mx.ones(shape, mx.bool_) if mask.dtype == mx.bool_ else mx.zeros(shape, mask.dtype)
            )
            mask = mx.concatenate([seen, mask], axis=-1)
        return mx.fast.scaled_dot_product_attention(queries, k, v, scale=scale, mask=mask)
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    q = (queries * mx.array(scale, queries.dtype)).reshape(b, kv_heads, group, dim)
    by_head = q.transpose(1, 0, 2, 3).reshape(kv_heads, b * group, dim)
    prefix_scores = (by_head @ prefix_keys[0].swapaxes(-1, -2)).reshape(kv_heads, b, group, -1)
    own_scores = _masked(q @ keys.swapaxes(-1, -2), mask.reshape(mask.shape[0], 1, 1, -1))
    scores = mx.concatenate([prefix_scores.transpose(1, 0, 2, 3), own_scores], axis=-1)
    weights = mx.softmax(scores, axis=-1, precise=True)
    prefix_weights = weights[..., :length].transpose(1, 0, 2, 3).reshape(kv_heads, b * group, -1)
    from_prefix = (prefix_weights @ prefix_values[0]).reshape(kv_heads, b, group, -1)
    out = from_prefix.transpose(1, 0, 2, 3) + weights[..., length:] @ values
    return out.reshape(b, heads, 1, values.shape[-1])


def _masked(scores: Any, mask: Any) -> Any:
    """Scores with a bool (keep) or additive mask applied, as MLX's own masked path does."""
    import mlx.core as mx

    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    return scores + mask.astype(scores.dtype)


def grouped_decode_attention(
    queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any, sinks: Any = None
) -> Any:
    """Attention of one decode step in a left-padded batch, as two grouped matmuls.

    The padding needs an array mask, and with one MLX's CUDA backend leaves its fused decode
    kernel for a generic path: 36 ms per decode step vs 12 ms this way (H100, 512 rows, 24
    layers). The query heads sharing a KV head become the rows of one matmul, so each KV head
    is read once per row. The arithmetic is MLX's own masked path (scores in the input dtype,
    a precise softmax); prefill chunks (no faster this way, measured) and anything else go to
    mlx-lm's attention.
    """
    import mlx.core as mx
    from mlx_lm.models import base

    b, heads, n, dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = (
        n == 1
        and sinks is None
        and isinstance(mask, mx.array)
        and mask.ndim == 4
        and mask.shape[1] == 1
        and heads % kv_heads == 0
        and not hasattr(cache, "bits")  # quantized caches have their own attention
    )
    if not grouped:
        return base.scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks
        )
    group = heads // kv_heads
    q = (queries * mx.array(scale, queries.dtype)).reshape(b, kv_heads, group * n, dim)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(b, kv_heads, group, n, -1)
    scores = _masked(scores, mask.reshape(mask.shape[0], 1, 1, mask.shape[2], mask.shape[3]))
    weights = mx.softmax(scores, axis=-1, precise=True).reshape(b, kv_heads, group * n, -1)
    return (weights @ values).reshape(b, heads, n, values.shape[-1])


def can_share_prefixes(model: Any) -> bool:
    """Whether every layer's attention goes through attention.batch_attention, which adds a
    held-once prefix back (shared_prefix_attention, or the fused kernel given the prefix):
    counted on one small batch. (A model whose attention does not call
    mlx-lm's shared function would silently ignore the prefix.)"""
    import mlx.core as mx

    from mlxbatch.pipeline.engine import attention
    from mlxbatch.pipeline.engine.row_kv import RowKVCache, row_cache

    cache = row_cache(model, share_prefix=True)
    if not all(isinstance(c, RowKVCache) for c in cache):
        return False
    model(mx.array([[1, 2]]), cache=cache)
    batch = [c.merge([c, c]) for c in cache]
    seen: list[Any] = []
    real_shared, real_fused = attention.shared_prefix_attention, attention.fused_decode_attention

    def shared(queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any) -> Any:
        seen.append(cache)
        return real_shared(queries, keys, values, cache, scale, mask)

    def fused(queries: Any, cache: Any, scale: float, mask: Any, prefix: Any = None) -> Any:
        if prefix is not None:
            seen.append(cache)
        return real_fused(queries, cache, scale, mask, prefix)

    attention.shared_prefix_attention, attention.fused_decode_attention = shared, fused
    try:
        with attention.batch_attention(model):
            model(mx.array([[3], [4]]), cache=batch)  # building the graph makes the calls
    finally:
        attention.shared_prefix_attention = real_shared
        attention.fused_decode_attention = real_fused
    return len(seen) == len(cache)
