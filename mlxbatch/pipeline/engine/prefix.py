"""Prefix caches for prefix groups: many groups' shared prefixes prefilled in a few batches.

A job of n samples per prompt has one prefix per prompt (the prompt less its last token), and
prefilling them one at a time is one batch-1 forward pass per prompt: on an H100, 64 prompts x
n=8 then ran 7.6 s with prefix reuse against 6.6 s without. Here prefixes of similar length are
right-padded into batches of about `tokens_per_step` tokens, run the way mlx-lm runs a prompt
batch (cache.py masks these steps causally and moves the padding to the left), and cut out one
per prefix. It does not decide which rows share a prefix (plan.py) or feed the decoder
(batch.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx

from mlxbatch.pipeline.engine.cache import RowBatchKVCache
from mlxbatch.pipeline.engine.row_kv import PrefilledRow, RowKVCache, continuing, row_cache

PREFILL_STEP = 2048  # tokens of each row per forward pass, as in mlx-lm's prompt processing
# A batch of rows to prefill after a shared prefix closes when its padding would pass this
# share of its tokens. The passes are queued without waiting for one another, so a pass costs
# little beyond its arithmetic: on an H200 (512 labelling rows, 78k tokens, benchmarks.timeline)
# limits 0.5 / 0.25 / 0.125 gave 0.26-0.27 / 0.25-0.26 / 0.22-0.26 s (2 / 3 / 5 batches, three
# runs each). When every pass waited for the last, 0.06 cost 11 batches and 0.51 s.
MAX_PADDING = 0.125
# Tokens of one pass over rows after a shared prefix, below the engine's cap for any prefill
# (Engine.prefill_tokens_per_step): peak memory follows the largest pass. On an H200 (512
# labelling rows) 16k against 98k: 8.9-12.5 against 16.4 GiB and 0.70-0.73 against 0.78-0.79 s,
# alternating processes; mixed and synthetic runs the same (benchmarks/results/2026-12-02b-h200).
ROWS_TOKENS_PER_PASS = 16384


def prefill(model: Any, ids: Any, cache: list[Any], *, wait: bool = True) -> None:
    """Run token ids [rows, L] into `cache`, PREFILL_STEP tokens at a time.

    Each step is queued before the one ahead of it is waited for: the device goes from step
    to step without waiting for the host, and no more than two steps' activations are alive.
    With `wait` off the last step is left queued too, so the caller goes on (builds its next
    batch, or the first decode step) while the device computes it.
    """
    queued = None
    for start in range(0, ids.shape[1], PREFILL_STEP):
        model(ids[:, start : start + PREFILL_STEP], cache=cache)
        state = [c.state for c in cache]
        mx.async_eval(state)
        if queued is not None:
            mx.eval(queued)
        queued = state
    if wait and queued is not None:
        mx.eval(queued)


def prefill_prefixes(
    model: Any, prefixes: list[list[int]], *, share_prefix: bool, tokens_per_step: int
) -> list[list[Any]]:
    """One per-layer KV cache (RowKVCaches) per prefix, in the order given.

    The model must use plain KV caches (`cache.row_cache` gives RowKVCaches for it).
    """
    caches: list[list[Any]] = [[] for _ in prefixes]
    for batch in _batches([len(p) for p in prefixes], tokens_per_step):
        if len(batch) == 1:
            caches[batch[0]] = row_cache(model, share_prefix)
            # Not waited for: the rows after it are queued behind it.
            prefill(model, mx.array(prefixes[batch[0]])[None], caches[batch[0]], wait=False)
            continue
        cut = _prefill_batch(model, [prefixes[i] for i in batch], share_prefix)
        for i, cache in zip(batch, cut, strict=True):
            caches[i] = cache
    return caches


def _batches(
    lengths: list[int], tokens_per_step: int, max_padding: float = 1.0
) -> Iterator[list[int]]:
    """Indices of `lengths`, shortest first, in batches of at most `tokens_per_step` padded
    tokens (one row at least) whose padding stays within `max_padding` of their tokens."""
    batch: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted, so the newest row is the longest: the batch pads every row to it.
        padded = (len(batch) + 1) * lengths[i]
        too_padded = padded - real - lengths[i] > max_padding * (real + lengths[i])
        if batch and (padded > tokens_per_step or too_padded):
            yield batch
            batch, real = [], 0
        batch.append(i)
        real += lengths[i]
    if batch:
        yield batch


def prefill_rows(
    model: Any, prefix: list[Any], suffixes: list[list[int]], *, tokens_per_step: int
) -> list[list[PrefilledRow]]:
    """Prefill rows that continue one prefix cache, in batches of similar length.

    Returns each row's per-layer cache handles, which mlx-lm's merge turns back into one
    batch cache (row_kv.PrefilledRow). mlx-lm would prefill them as one batch padded to the
    longest row; here a batch ends where padding would pass MAX_PADDING.
    """
    from mlxbatch.pipeline.engine.attention import batch_attention

    lengths = [len(s) for s in suffixes]
    tokens_per_step = min(tokens_per_step, ROWS_TOKENS_PER_PASS)
    batches = list(_batches(lengths, tokens_per_step, MAX_PADDING))
    parts: list[tuple[list[int], list[Any]]] = []
    # A prefix held once is added back by batch_attention's attention (cache.py).
    with batch_attention(model):
        for batch, padded in zip(batches, _passes(suffixes, batches), strict=True):
            layers = continuing(prefix, len(batch))
            _prefill_padded(model, layers, *padded, wait=False)
            parts.append((batch, layers))
    # Rows in the order given: batches are in length order, so put them back.
    order = [i for batch, _ in parts for i in batch]
    stacked = [RowBatchKVCache.stack([p[k] for _, p in parts]) for k in range(len(prefix))]
    # Queued, not waited for: mlx-lm's first decode step is built and queued behind these
    # passes (the padding it needs is kept on the host, cache.py).
    mx.async_eval([c.state for c in stacked])
    handles: list[list[PrefilledRow]] = [[] for _ in suffixes]
    for position, i in enumerate(order):
        handles[i] = [PrefilledRow(layer, position) for layer in stacked]
    return handles


def _passes(
    rows: list[list[int]], batches: list[list[int]]
) -> Iterator[tuple[Any, list[int], Any]]:
    """Each batch's token ids [rows, width], right-padded to its longest row, and its rows'
    right padding (a list and an array). Every batch's ids and padding go to the device in one
    copy each: made per pass, each such array waited ~6 ms for the passes queued ahead of it
    (H200, 512 labelling rows in 4 passes); made at once, prefill_rows' host time went from
    0.097-0.104 to 0.090 s."""
    widths = [max(len(rows[i]) for i in batch) for batch in batches]
    padding = [[w - len(rows[i]) for i in batch] for batch, w in zip(batches, widths, strict=True)]
    all_ids = mx.array(
        [
            t
            for batch, w in zip(batches, widths, strict=True)
            for i in batch
            for t in rows[i] + [0] * (w - len(rows[i]))
        ],
        mx.int32,
    )
    all_padding = mx.array([p for pad in padding for p in pad], mx.int32)
    start = first = 0
    for batch, w, pad in zip(batches, widths, padding, strict=True):
        end = start + len(batch) * w
        yield all_ids[start:end].reshape(len(batch), w), pad, all_padding[first : first + len(pad)]
        start, first = end, first + len(pad)


def _prefill_batch(model: Any, prefixes: list[list[int]], share_prefix: bool) -> list[list[Any]]:
    batch = [RowBatchKVCache([0] * len(prefixes)) for _ in row_cache(model)]
    [padded] = _passes(prefixes, [list(range(len(prefixes)))])
    _prefill_padded(model, batch, *padded)
    rows: list[list[Any]] = []
    for i in range(len(prefixes)):
        row = [RowKVCache(share_prefix) for _ in batch]
        for layer, cache in zip(batch, row, strict=True):
            cache.state = layer.extract(i).state
        rows.append(row)
    # Each prefix gets its own copy now, so the batch's arrays are freed.
    mx.eval([c.state for row in rows for c in row])
    return rows


def _prefill_padded(
    model: Any, layers: list[Any], ids: Any, right: list[int], padding: Any, *, wait: bool = True
) -> None:
    """Prefill token ids [rows, width] into the batch caches `layers`, rows right-padded by
    `right` (`padding` on the device; these steps get a causal mask, cache.py), then move each
    row's padding to the left."""
    if not ids.shape[1]:
        return
    for c in layers:
        c.pad_right(right, padding)
    prefill(model, ids, layers, wait=wait)
    for c in layers:
        c.finalize()
