"""Array operations on a batch's keys or values laid out as [rows, heads, positions, dim].

What cache.py needs to re-align, gather and widen a batch's KV arrays, kept apart from the
cache classes that decide when to. Nothing here knows about prefixes or padding bookkeeping.

Every layer of a batch is padded alike, so the padding arrays and gather positions made for
one layer serve the next ones (`padding_array`, `padding_to_front`): a prefill pass makes them
once instead of once per layer (24 times for a 24-layer model), which saves host time.
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx


def right_aligned(x: Any, rows: int, end: int, like: Any, length: int) -> Any:
    """The first `end` positions of x [rows, H, _, D], padded on the left to `length`; zeros
    shaped like `like` where the batch has no keys yet (x is None)."""
    if x is None:
        return mx.zeros((rows, like.shape[1], length, like.shape[3]), like.dtype)
    x = x[..., :end, :]
    pad = length - end
    return mx.pad(x, [(0, 0), (0, 0), (pad, 0), (0, 0)]) if pad else x


def after_prefix(prefix: Any, rows: Any) -> Any:
    """The prefix [1, H, P, D] copied in front of every row of rows [B, H, L, D]."""
    return mx.concatenate([broadcast_rows(prefix, rows.shape[0]), rows], axis=2)


def gather_positions(x: Any, positions: Any) -> Any:
    """x [B, H, L, D] with each row's L axis taken at `positions` [B, L'] (head vectors whole)."""
    return gather_flat(x, _flat_positions(positions, x.shape[1], x.shape[2]))


def gather_flat(x: Any, flat: Any) -> Any:
    """x [B, H, L, D] gathered at `flat` (from padding_to_front), head vectors whole."""
    b, h, n, d = x.shape
    return x.reshape(b * h * n, d)[flat].reshape(b, h, -1, d)


def _flat_positions(positions: Any, heads: int, length: int) -> Any:
    """Positions [B, L'] of each row as indices into [B * H * length] head vectors."""
    starts = (mx.arange(positions.shape[0] * heads) * length).reshape(-1, heads, 1)
    return (starts + positions[:, None, :]).reshape(-1)


def broadcast_rows(x: Any, rows: int) -> Any:
    """x [1, ...] copied into `rows` rows."""
    return mx.contiguous(mx.broadcast_to(x, (rows, *x.shape[1:])))


# The last batch's arrays are kept: its layers ask one after another.
@functools.lru_cache(maxsize=1)
def padding_array(padding: tuple[int, ...]) -> Any:
    """Per-row padding as an array, one copy from the host for all of a batch's layers."""
    return mx.array(padding, mx.int32)


_to_front: tuple[tuple, Any] | None = None  # the last batch's key and indices


def padding_to_front(key: tuple[int, ...], padding: Any, heads: int, length: int) -> Any:
    """Indices for gather_flat that move each row's last `padding[r]` of `length` positions
    (right padding, `key` on the host) to the front, the row's tokens to the end."""
    global _to_front
    if _to_front is None or _to_front[0] != (key, heads, length):
        positions = (mx.arange(length)[None, :] - padding[:, None]) % length
        _to_front = ((key, heads, length), _flat_positions(positions, heads, length))
    return _to_front[1]
