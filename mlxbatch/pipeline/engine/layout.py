"""Array operations on a batch's keys or values laid out as [rows, heads, positions, dim].

What cache.py needs to re-align, gather and widen a batch's KV arrays, kept apart from the
cache classes that decide when to. Nothing here knows about prefixes or padding bookkeeping.
"""

from __future__ import annotations

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
    b, h, n, d = x.shape
    starts = (mx.arange(b * h) * n).reshape(b, h, 1)
    flat = (starts + positions[:, None, :]).reshape(-1)
    return x.reshape(b * h * n, d)[flat].reshape(b, h, positions.shape[1], d)


def broadcast_rows(x: Any, rows: int) -> Any:
    """x [1, ...] copied into `rows` rows."""
    return mx.contiguous(mx.broadcast_to(x, (rows, *x.shape[1:])))
