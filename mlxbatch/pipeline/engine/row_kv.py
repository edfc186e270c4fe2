"""One row's KV caches, as mlx-lm hands them to a batch: what RowBatchKVCache merges.

A RowKVCache holds one row's (or one shared prefix's) keys and values; a PrefilledRow is a
handle on one row of a batch that prefix.py prefilled, so mlx-lm can pass it around as a row
and merge it back without a copy. The batch layout and its bookkeeping are cache.py's.
"""

from __future__ import annotations

import itertools
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlxbatch.pipeline.engine.cache import RowBatchKVCache

_prefix_ids = itertools.count(1)


class PrefilledRow:
    """One row of a batch cache whose rows were prefilled together (prefix.prefill_rows).

    mlx-lm merges the per-row caches it is given; rows handed over in the batch's own order
    merge back into that batch without a copy, any other selection is gathered from it
    (RowBatchKVCache.merge, pick).
    """

    __slots__ = ("batch", "row")  # one per row and layer: 12,288 for 512 rows of 24 layers
    nbytes = 0  # counted once, in the batch cache

    def __init__(self, batch: RowBatchKVCache, row: int):
        self.batch, self.row = batch, row

    @classmethod
    def merge(cls, caches: list[Any]) -> Any:
        return RowBatchKVCache.merge(caches)


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
        return RowBatchKVCache.merge(caches)

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
