"""Runs of consecutive sequence numbers: seqs as (first, last) spans, and the gaps between spans.

The store records which manifest seqs hold a successful result as spans (store.py), so a
resume looks up only the gaps. Nothing here touches the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def spans_of(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted seqs as (first, last) runs of consecutive numbers."""
    spans: list[tuple[int, int]] = []
    for seq in seqs:
        if spans and seq <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], max(seq, spans[-1][1]))
        else:
            spans.append((seq, seq))
    return spans


def gaps_between(spans: Iterable[tuple[int, int]], end: int) -> Iterator[tuple[int, int]]:
    """The (first, last) runs of seqs in [0, end) that no span, sorted by first, covers."""
    start = 0
    for first, last in spans:
        if start >= end:
            return
        if first > start:
            yield (start, min(first, end) - 1)
        start = max(start, last + 1)
    if start < end:
        yield (start, end - 1)
