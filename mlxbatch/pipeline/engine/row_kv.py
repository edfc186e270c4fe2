"""One row's KV caches, as mlx-lm hands them to a batch, and how they merge into one.

A RowKVCache holds one row's (or one shared prefix's) keys and values; a PrefilledRow is a
handle on one row of a batch that prefix.py prefilled, so mlx-lm can pass it around as a row
and merge it back without a copy. `merge_rows` makes their RowBatchKVCache: rows of one prefix
hold it once (or in one broadcast copy), rows of several are joined in the plain layout in one
copy; `continuing` makes the per-layer caches of rows about to be prefilled after a prefix.
The batch layout and its bookkeeping are cache.py's.
"""

from __future__ import annotations

import itertools
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlxbatch.pipeline.engine.cache import RowBatchKVCache
from mlxbatch.pipeline.engine.layout import broadcast_rows

_prefix_ids = itertools.count(1)


class PrefilledRow:
    """One row of a batch cache whose rows were prefilled together (prefix.prefill_rows).

    mlx-lm merges the per-row caches it is given; rows handed over in the batch's own order
    merge back into that batch without a copy, any other selection is gathered from it
    (merge_rows, RowBatchKVCache.pick).
    """

    __slots__ = ("batch", "row")  # one per row and layer: 12,288 for 512 rows of 24 layers
    nbytes = 0  # counted once, in the batch cache

    def __init__(self, batch: RowBatchKVCache, row: int):
        self.batch, self.row = batch, row

    @classmethod
    def merge(cls, caches: list[Any]) -> Any:
        return merge_rows(caches)


class RowKVCache(KVCache):
    """One row's (or one shared prefix's) KV cache, merged into a RowBatchKVCache."""

    keys: Any  # set by KVCache; declared for the type checker
    values: Any

    def __init__(self, share_prefix: bool = False):
        super().__init__()
        self.share_prefix = share_prefix  # merged, identical copies keep one prefix
        self.prefix_id = next(_prefix_ids)
        self._compact: Any = None  # keys that compact() made

    @classmethod
    def merge(cls, caches: list[Any]) -> Any:
        return merge_rows(caches)

    def compact(self) -> tuple[Any, Any]:
        """Keys and values cut to the offset, contiguous (decode kernels read a held-once
        prefix as it is), kept as the buffer: every later merge of this cache reuses them."""
        if self.keys.shape[2] != self.offset or self._compact is not self.keys:
            self.keys = mx.contiguous(self.keys[..., : self.offset, :])
            self.values = mx.contiguous(self.values[..., : self.offset, :])
            self._compact = self.keys
        return self.keys, self.values


def row_cache(model: Any, share_prefix: bool = False) -> list[Any]:
    """An empty per-layer cache for one row: RowKVCaches where the model uses plain ones."""
    cache = make_prompt_cache(model)
    if all(type(c) is KVCache for c in cache):
        return [RowKVCache(share_prefix) for _ in cache]
    return cache


def merge_rows(caches: list[Any]) -> RowBatchKVCache:
    """One batch cache of rows' caches: RowKVCaches and PrefilledRows, in any mix (a batch
    may take rows of several groups); runs of each kind merge on their own."""
    parts = [
        _merge_copies(list(run)) if batch is None else batch.pick([r.row for r in run])
        for batch, run in itertools.groupby(caches, key=lambda c: getattr(c, "batch", None))
    ]
    if len(parts) == 1:
        return parts[0]
    # Parts of different prefixes: each in the plain layout, joined in one copy (one
    # `extend` per part would copy the growing batch again each time: 64 n=8 groups).
    for part in parts:
        part.unshare()
    return RowBatchKVCache.stack(parts)


def _merge_copies(caches: list[Any]) -> RowBatchKVCache:
    first = caches[0]
    if all(c.keys is None for c in caches):
        return RowBatchKVCache([0] * len(caches))  # mlx-lm's merge returns its base class here
    if any(c is not first for c in caches):
        return RowBatchKVCache.merge(caches)  # mlx-lm's, making a RowBatchKVCache
    cache = RowBatchKVCache([0] * len(caches))
    cache.offset += first.offset
    if getattr(first, "share_prefix", False):
        cache.prefix, cache.prefix_id = first.compact(), first.prefix_id
        return cache
    keys, values = first.compact()
    cache.keys = broadcast_rows(keys, len(caches))
    cache.values = broadcast_rows(values, len(caches))
    cache._idx = first.offset
    return cache


def continuing(prefix: list[Any], rows: int) -> list[Any]:
    """Per-layer batch caches of `rows` rows after one prefix (one-row RowKVCaches), as each
    layer's merge([c] * rows) would give, but with the same padding and offset arrays in every
    layer: a prefill pass then builds them once, not once per layer."""
    first = prefix[0]
    if not getattr(first, "share_prefix", False) or first.keys is None:
        return [c.merge([c] * rows) for c in prefix]
    left_padding = mx.zeros((rows,), mx.int32)
    offset = mx.full((rows,), first.offset, mx.int32)
    layers = []
    for c in prefix:
        cache = RowBatchKVCache([])  # arrays replaced below, never evaluated
        cache.left_padding, cache.offset = left_padding, offset
        cache._padding = (left_padding, [0] * rows)
        cache.prefix, cache.prefix_id = c.compact(), c.prefix_id
        layers.append(cache)
    return layers
