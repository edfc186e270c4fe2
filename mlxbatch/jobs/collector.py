"""No full garbage collections while a run goes on, and fewer young ones.

A run allocates many small objects (tasks, per-step responses, cache handles), so the
collector runs often, and every so often it makes a full collection, which walks every object
in the process: the imported libraries and whatever an embedding process keeps. Such
collections took ~0.2 s of a 0.7-0.9 s labelling run, one run in three, on an H200 host
(`benchmarks.timeline` reports the collector's time). While a run goes on, the oldest
generation's threshold is raised out of reach, so only the young generations are collected;
the old one is collected on the collector's usual schedule once the run ends. (Freezing the
heap instead, `gc.freeze()`, kept garbage left by one run away from the collector in the next:
a process running thousands of runs ran out of file descriptors.) The youngest generation is
collected every YOUNG_THRESHOLD allocations instead of 700: most of a run's objects are freed
by reference counting before then, so the collector scans far fewer (512 labelling rows with
generation stubbed out, 2-core CPU: 34 collections taking 6-18 ms a run became 2 taking
0.5-7 ms, ~1 ms in most runs). Reference counting frees what a run drops, as before; only
cycles wait longer to be collected.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# Full collections come after this many collections of the middle generation (10 by default).
OUT_OF_REACH = 1_000_000_000
# Allocations (less deallocations) between collections of the youngest generation.
YOUNG_THRESHOLD = 10_000


@contextlib.contextmanager
def young_collections_only() -> Iterator[None]:
    """Collect only the young generations, less often, while the block runs; the thresholds
    are put back."""
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], YOUNG_THRESHOLD), thresholds[1], OUT_OF_REACH)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
