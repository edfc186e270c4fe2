"""CutRow: one row of a batch KV cache, cut out only when it is first read.

mlx-lm cuts a finished row's cache out of the batch for every layer, and a batch job drops
it unread; here the cut is a handle that slices the row (and puts its shared prefix back in
front) on first use of keys, values or offset. Which rows to cut, and the batch's padding,
are cache.py's concern.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class CutRow(KVCache):
    """One row of a batch cache, sliced from it on first use of keys, values or offset."""

    def __init__(self, keys: Any, values: Any, row: int, start: int, end: int, prefix: Any):
        # No KVCache.__init__: its keys/values/offset would hide __getattr__.
        self._source = (keys, values, row, start, end, prefix)

    def __getattr__(self, name: str) -> Any:
        if name not in ("keys", "values", "offset") or "_source" not in self.__dict__:
            raise AttributeError(name)
        keys, values, row, start, end, prefix = self.__dict__.pop("_source")
        if keys is not None:
            keys = mx.contiguous(keys[row : row + 1, :, start:end])
            values = mx.contiguous(values[row : row + 1, :, start:end])
        if prefix is not None:
            prefix_keys, prefix_values = prefix
            if keys is None:
                keys, values = prefix_keys, prefix_values
            else:
                keys = mx.concatenate([prefix_keys, keys], axis=2)
                values = mx.concatenate([prefix_values, values], axis=2)
        self.keys, self.values = keys, values
        self.offset = 0 if keys is None else keys.shape[2]
        return getattr(self, name)
