"""Keep Python's garbage collector off the objects a window finds in place while it generates.

Decoding allocates many small objects per step (mlx-lm's per-row responses and per-layer cache
handles), so collections run often, and now and then a full one walks every object in the
process: the imported libraries, the tokenizer, the window's tasks. One such collection took
0.26 s of a 0.83 s labelling run on an H200 host (`benchmarks.timeline` reports the collector's
time). `gc.freeze()` moves what is alive when generation starts out of the collector's reach and
`gc.unfreeze()` hands it back afterwards, so nothing stays uncollected for good: objects made
while generating are collected as before, and cycles among the frozen ones wait for the window
to end. It changes nothing else; reference counting frees what the run drops as it did.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the objects alive now for the block; left alone if the caller froze some first
    (unfreezing would hand theirs back too)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
