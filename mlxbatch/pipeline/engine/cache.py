"""KV caches for rows that mlx-lm batches: a shared prefix held once, causal prefill masks.

mlx-lm merges the rows' caches into a BatchKVCache with one copy of every row's whole history.
Here, when every row of a merge starts from the same prefix cache, the batch keeps that
prefix's keys and values once (`RowBatchKVCache.prefix`) and only the rows' own tokens per
row; attention.py adds the prefix back in (one matmul over all rows in a decode step). Where
that attention is not in place (`RowKVCache.share_prefix` off) the prefix is broadcast into
every row in one copy. A batch that meets rows of another prefix is turned back into the
plain layout first.

A prefill step in which no row is left-padded gets a plain causal mask: rows that start
together (after the same prefix, or in a fresh batch whose shorter prompts mlx-lm right-pads)
need nothing more, and MLX can then use its fused attention. Models with other cache kinds
keep mlx-lm's caches.

Rows that prefix.py prefilled together come to mlx-lm as PrefilledRows, which merge back into
their batch without a copy; rows of several prefixes in one merge are joined in one copy.
How rows' caches merge into a batch cache, and the one-row caches themselves, are row_kv.py's.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from mlxbatch.pipeline.engine.cut_row import CutRow
from mlxbatch.pipeline.engine.layout import (
    after_prefix,
    broadcast_rows,
    gather_flat,
    gather_positions,
    padding_array,
    padding_to_front,
    right_aligned,
)


class RowBatchKVCache(BatchKVCache):
    """A BatchKVCache that can hold one prefix for all rows and masks unpadded steps causally.

    With `prefix` set, keys/values/_idx/left_padding describe only the rows' own tokens, while
    `offset` (the rotary position) still counts the prefix.
    """

    # Set by BatchKVCache; declared for the type checker, which cannot see into mlx-lm.
    keys: Any
    values: Any
    offset: Any
    left_padding: Any
    _right_padding: Any
    _idx: int

    prefix: tuple[Any, Any] | None = None  # keys, values: [1, kv_heads, length, head_dim]
    prefix_id: int = 0  # equal for batches holding the same prefix (copies included)
    _padding: tuple[Any, list[int]] | None = None  # left_padding and its values, read once
    _right_list: list[int] | None = None  # prepare's right padding, for finalize's memo

    def __init__(self, left_padding: list[int]):
        if any(left_padding):
            super().__init__(left_padding)
        else:
            # Zeros made on the device: mlx-lm copies the list from the host into two arrays,
            # for every layer of every batch made.
            super().__init__([])
            self.left_padding = mx.zeros((len(left_padding),), mx.int32)
            self.offset = mx.zeros((len(left_padding),), mx.int32)
        # Known here without reading the device: masks of the first steps need no sync.
        self._padding = (self.left_padding, list(left_padding))

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> Any:
        unpadded_prefill = N > 1 and not return_array and kwargs.get("window_size") is None
        # Decode steps (N == 1) never ask; a prefill step reads the padding from the device
        # only when it is not known on the host (a sync: the queued steps finish first).
        if unpadded_prefill and not any(self._left_padding_list()):
            return "causal"
        return super().make_mask(N, return_array=return_array, **kwargs)

    def update_and_fetch(self, keys: Any, values: Any) -> Any:
        if self.keys is None and keys.shape[2] > 1:
            # A first prefill step's keys become the buffer as they are: mlx-lm copies them
            # into fresh zeros, and finalize or the first decode step copies them again.
            self.keys, self.values = keys, values
            self.offset = self.offset + keys.shape[2]
            self._idx = keys.shape[2]
            return keys, values
        return super().update_and_fetch(keys, values)

    def finalize(self) -> None:
        """Move right-padded rows' tokens to the end, as mlx-lm's finalize does, but gathering
        whole head vectors (its element-wise gather took 221 ms vs 27 ms: H100, 214 rows of
        1,636 tokens, 24 layers), at positions made once for all layers."""
        if self._right_padding is not None:
            padding = self._right_padding
            right = self._right_list or padding.tolist()
            _, heads, n, _ = self.keys.shape
            flat = padding_to_front(tuple(right), padding, heads, n)
            self.keys = gather_flat(self.keys, flat)
            self.values = gather_flat(self.values, flat)
            self.offset = self.offset - padding
            known = self._known_padding()
            self.left_padding = self.left_padding + padding
            if known is not None:
                self._padding = (
                    self.left_padding,
                    [a + b for a, b in zip(known, right, strict=True)],
                )
        self._right_padding = self._right_list = None

    def filter(self, batch_indices: Any) -> None:
        """mlx-lm's filter, with the padding kept on the host: mlx-lm reads it from the
        device for every layer each time rows finish (24 syncs per finished step, 0.2 s of a
        4.6 s synthetic run, H200). Nothing is copied when every row stays, in order."""
        kept = [int(i) for i in batch_indices]  # mlx-lm passes a list
        padding = self._left_padding_list()
        kept_padding = [padding[i] for i in kept]
        shift = min(kept_padding, default=0)  # padding every kept row has: cut off
        if kept == list(range(len(padding))) and shift == 0:
            return
        index = mx.array(kept, mx.int32)
        if self.keys is not None:
            self.keys = self.keys[index][..., shift:, :]
            self.values = self.values[index][..., shift:, :]
        self._idx -= shift
        self.offset = self.offset[index]
        self.left_padding = self.left_padding[index] - shift
        self._padding = (self.left_padding, [p - shift for p in kept_padding])

    def extend(self, other: Any) -> None:
        shared = self.prefix is not None or getattr(other, "prefix", None) is not None
        same = isinstance(other, RowBatchKVCache) and other.prefix_id == self.prefix_id
        if shared and not same:
            self.unshare()
            if isinstance(other, RowBatchKVCache):
                other.unshare()
        super().extend(other)

    def unshare(self) -> None:
        """Copy the prefix into every row: the plain layout, [padding, prefix, own tokens]."""
        if self.prefix is None:
            return
        prefix_keys, prefix_values = self.prefix
        rows, length = self.left_padding.shape[0], prefix_keys.shape[2]
        if self.keys is None:
            self.keys = broadcast_rows(prefix_keys, rows)
            self.values = broadcast_rows(prefix_values, rows)
        else:
            # Row r's padding moves from after the prefix to before it.
            n = self.keys.shape[2] + length
            j = mx.arange(n)[None, :]
            pad = self.left_padding[:, None]
            positions = mx.where(j < pad, 0, mx.where(j < pad + length, j - pad, j))
            self.keys = gather_positions(after_prefix(prefix_keys, self.keys), positions)
            self.values = gather_positions(after_prefix(prefix_values, self.values), positions)
        self._idx += length
        self.prefix, self.prefix_id = None, 0

    def prepare(
        self,
        *,
        left_padding: list[int] | None = None,
        lengths: list[int] | None = None,
        right_padding: list[int] | None = None,
    ) -> None:
        """mlx-lm's prepare, with each padding copied from the host once for all layers, and
        left padding added to new arrays (mlx-lm adds in place; layers may share arrays)."""
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("Left padding can only be added to an empty BatchKVCache")
            known = self._known_padding()
            added = padding_array(tuple(left_padding))
            self.left_padding = self.left_padding + added
            self.offset = self.offset - added
            if known is not None:
                self._padding = (
                    self.left_padding,
                    [a + b for a, b in zip(known, left_padding, strict=True)],
                )
        if right_padding is not None:
            self.pad_right(list(right_padding), padding_array(tuple(right_padding)))

    def pad_right(self, padding: list[int], array: Any) -> None:
        """Rows right-padded by `padding` (also as `array`, which layers may share) in the next
        prefill steps: they get a causal mask, and finalize moves the padding to the left."""
        if max(padding, default=0) > 0:
            self._right_padding, self._right_list = array, padding

    def extract(self, idx: int) -> Any:
        """One row's cache, as mlx-lm's extract cuts it out (with the prefix in front).

        mlx-lm cuts one out for every finished row and layer, reading the whole padding array
        from the device each time, and the batch drops them unread: here the padding is read
        once per batch state and the row is sliced only when first used.
        """
        return self.cutter()(idx)

    def cutter(self) -> Any:
        """A function that cuts a row out of this batch as it is now, whatever the batch does
        afterwards (filter, extend, another step)."""
        keys, values, end, prefix = self.keys, self.values, self._idx, self.prefix
        starts = self._left_padding_list() if keys is not None else None
        return lambda idx: CutRow(keys, values, idx, starts[idx] if starts else 0, end, prefix)

    def pick(self, picked: list[int]) -> RowBatchKVCache:
        """This cache if `picked` is all of its rows in order, else a new cache of those rows
        (this one unchanged, for the rows picked later)."""
        if picked == list(range(self.left_padding.shape[0])):
            return self
        index = mx.array(picked)
        cache = RowBatchKVCache([0] * len(picked))
        if self.keys is not None:
            cache.keys, cache.values = self.keys[index], self.values[index]
        cache.offset, cache.left_padding = self.offset[index], self.left_padding[index]
        known = self._known_padding()
        if known is not None:
            cache._padding = (cache.left_padding, [known[i] for i in picked])
        cache._idx, cache.prefix, cache.prefix_id = self._idx, self.prefix, self.prefix_id
        return cache

    @classmethod
    def stack(cls, batches: list[RowBatchKVCache]) -> RowBatchKVCache:
        """One cache of the batches' rows, in order: each right-aligned at the longest, as
        mlx-lm's `extend` does, but in one copy rather than one per batch."""
        first = batches[0]
        if len(batches) == 1:
            return first
        idx = max(b._idx for b in batches)
        cache = cls([0] * sum(b.left_padding.shape[0] for b in batches))
        cache._idx, cache.prefix, cache.prefix_id = idx, first.prefix, first.prefix_id
        cache.offset = mx.concatenate([b.offset for b in batches])
        cache.left_padding = mx.concatenate([b.left_padding + idx - b._idx for b in batches])
        known = [b._known_padding() for b in batches]
        if all(k is not None for k in known):
            shifted = [
                p + idx - b._idx for b, k in zip(batches, known, strict=True) for p in k or ()
            ]
            cache._padding = (cache.left_padding, shifted)
        filled = [b for b in batches if b.keys is not None]
        if filled:
            for name in ("keys", "values"):
                like = getattr(filled[0], name)
                parts = [
                    right_aligned(getattr(b, name), b.left_padding.shape[0], b._idx, like, idx)
                    for b in batches
                ]
                setattr(cache, name, mx.concatenate(parts))
        return cache

    def _left_padding_list(self) -> list[int]:
        known = self._known_padding()
        if known is None:  # a read from the device: it waits for every step queued before it
            known = self.left_padding.tolist()
            self._padding = (self.left_padding, known)
        return known

    def _known_padding(self) -> list[int] | None:
        """left_padding as kept on the host, where it is still current. Every other change
        to left_padding binds a new array, so its identity tells."""
        memo = self._padding
        return memo[1] if memo is not None and memo[0] is self.left_padding else None

    @property
    def nbytes(self) -> int:
        own = super().nbytes
        return own + (sum(p.nbytes for p in self.prefix) if self.prefix is not None else 0)
