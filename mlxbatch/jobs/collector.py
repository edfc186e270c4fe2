"""Keep Python's garbage collector off the objects that were alive before a run started.

A run allocates many small objects (tasks, per-step responses, cache handles), so collections
run often, and now and then a full one walks every object in the process: the imported
libraries and whatever an embedding process keeps. Such collections took ~0.2 s of a 0.7-0.9 s
labelling run, one run in three, on an H200 host (`benchmarks.timeline` reports the collector's
time). `gc.freeze()` moves what is alive when the run starts out of the collector's reach and
`gc.unfreeze()` hands it back when it ends, so nothing stays uncollected for good: objects the
run makes are collected as before. That also hands back anything frozen before the run (Python
3.12 starts with a few hundred objects frozen; a program that froze its own heap gets it back
collectable): freezing only decides what the collector walks, never what stays alive.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the objects alive now for the block; everything frozen is handed back after."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
