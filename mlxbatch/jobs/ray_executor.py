"""Generate a job's windows on a Ray cluster; the store stays with the driver.

The driver (the `mlxbatch process` process) reads, validates, renders, keys and plans exactly
as for a local run. Instead of generating a window itself, it sorts the window's pending tasks
by prompt length, cuts them into chunks and hands the chunks to a pool of Ray actors: one per
`mlx` resource unit (a Mac started with `--resources='{"mlx": 1}'`), else one per GPU, else
one per machine, or `ray_workers` of them. Each actor loads the model once and runs
`dispatch.generate_window` over a chunk; the finished Results come back to the driver, which
alone writes the store (one transaction per chunk). Durability, resume and exactly-once output
are therefore those of a local run: the store is keyed, and only the driver writes it.

Workers that die (killed, out of memory, machine gone) lose only their in-flight chunks: the
driver starts a fresh actor in the dead one's place and reissues the chunks. A chunk is
committed at most once, and only rows it was asked for; a chunk that kills its worker twice is
split in halves, down to the one row that does it, which becomes an error record
(`worker_died`) so the run goes on. SIGINT/SIGTERM: nothing new is submitted, the workers stop
at their next decode step and return what they finished, which is committed; the rest is left
for the next run.

Ray is imported only when a run asks for it (`--ray`, `ray:` or `executor: ray`):
`pip install 'mlxbatch[ray]'`. How a window is cut into chunks, and what becomes of a chunk
whose worker died, is in chunks.py; the actor itself in ray_worker.py; reaching the cluster
and planning the workers in ray_connect.py; starting, checking and replacing them in
ray_slots.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mlxbatch.jobs.chunks import Chunk, after_failure, split_chunks
from mlxbatch.jobs.ray_connect import RayExecutorError, failure_reason
from mlxbatch.jobs.ray_slots import PoolStats, Slot, WorkerSlots
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.records import Result, Task

log = logging.getLogger("mlxbatch.ray")

IN_FLIGHT_PER_WORKER = 2  # the next chunk waits in the actor's queue: no idle round trip
STOP_GRACE_SECONDS = 20.0  # after a signal, how long finished work may take to come back
STARTUP_NOTICE_SECONDS = 60.0


class RayPool:
    """A pool of `Worker` actors with the signature of `dispatch.generate_window`.

    Nothing is started until the first window with work: a finished job never touches Ray.
    `close()` ends the actors (and the local Ray instance, if this pool started it).
    """

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.stats = PoolStats()
        self.workers = WorkerSlots(spec, self.stats)
        self._next_chunk = 0
        self._committed: set[int] = set()

    def _start(self, identity: str) -> Any:
        return self.workers.start(identity)

    def close(self) -> None:
        self.workers.close()

    # -- one window -----------------------------------------------------------------------------

    def generate_window(
        self,
        todo: list[Task],
        spec: JobSpec,
        engine: Any,
        on_result: Callable[[Result], None],
        should_stop: Callable[[], bool],
        on_batch_size: Callable[[int], None] = lambda size: None,
    ) -> None:
        """Generate `todo` on the pool; each chunk's Results go to `on_result` together."""
        if not todo or should_stop():
            return
        ray = self._start(engine.identity)

        def commit(results: list[Result]) -> None:
            if results:
                on_batch_size(len(results))
                for result in results:
                    on_result(result)

        chunks = split_chunks(todo, len(self.workers.slots), self._next_chunk)
        self._next_chunk += len(chunks)
        self.stats.chunks += len(chunks)
        # Chunks go out from the right: longest prompts first, so the window's end is short;
        # a reissued chunk is appended on the right, to go out next.
        queue = deque(chunks)
        pending: dict[Any, tuple[Slot, Chunk]] = {}
        waiting_since = time.monotonic()
        while (queue or pending) and not should_stop():
            self._submit(queue, pending)
            refs = list(pending) + self.workers.loading()
            if not refs:
                raise RayExecutorError("no Ray worker is left to generate on")
            done, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in done:
                if ref in pending:
                    self._collect(ref, pending, queue, commit)
                else:
                    self.workers.on_ready(ref)
            if pending or self.workers.any_started():
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > STARTUP_NOTICE_SECONDS:
                log.warning(
                    "waiting for Ray workers to load %s (cluster resources: %s)",
                    spec.model,
                    ray.cluster_resources(),
                )
                waiting_since = time.monotonic()
        if pending:
            self._drain(pending, commit)

    def _submit(self, queue: deque[Chunk], pending: dict[Any, tuple[Slot, Chunk]]) -> None:
        for slot in self.workers.slots:
            while slot.started and queue and len(slot.in_flight) < IN_FLIGHT_PER_WORKER:
                chunk = queue.pop()
                ref = slot.actor.generate.remote(chunk.tasks)
                slot.in_flight.append(ref)
                pending[ref] = (slot, chunk)

    def _collect(
        self,
        ref: Any,
        pending: dict[Any, tuple[Slot, Chunk]],
        queue: deque[Chunk],
        commit: Callable[[list[Result]], None],
        *,
        stopping: bool = False,
    ) -> None:
        ray = self.workers.ray
        slot, chunk = pending.pop(ref)
        try:
            results = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._lost(slot, ref, chunk, pending, queue, commit, failure_reason(e), stopping)
            return
        except ray.exceptions.RayError as e:  # generate raised; the worker lives on
            slot.in_flight.remove(ref)
            log.warning("a chunk of %d rows failed on %s: %s", len(chunk.tasks), slot.name, e)
            self._retry(chunk, failure_reason(e), queue, commit)
            return
        slot.in_flight.remove(ref)
        self._commit_chunk(chunk, results, queue, commit, stopping)

    def _commit_chunk(
        self,
        chunk: Chunk,
        results: list[Result],
        queue: deque[Chunk],
        commit: Callable[[list[Result]], None],
        stopping: bool,
    ) -> None:
        """Commit a returned chunk once, and only the rows it was sent with."""
        if chunk.id in self._committed:  # never twice, whatever Ray does
            return
        self._committed.add(chunk.id)
        wanted = {t.key for t in chunk.tasks}
        got: dict[str, Result] = {}
        for result in results:
            if result.key in wanted and result.key not in got:
                got[result.key] = result
        commit(list(got.values()))
        missing = [t for t in chunk.tasks if t.key not in got]
        if missing and not stopping:  # a worker told to stop by someone else
            queue.appendleft(Chunk(self._new_chunk_id(), missing))

    def _lost(
        self,
        slot: Slot,
        ref: Any,
        chunk: Chunk,
        pending: dict[Any, tuple[Slot, Chunk]],
        queue: deque[Chunk],
        commit: Callable[[list[Result]], None],
        reason: str,
        stopping: bool,
    ) -> None:
        """A worker died: commit what it had finished, reissue the rest, replace it.

        Its chunks ran in submission order: the first unfinished one was running when it died
        and counts a failure against its rows; the ones queued behind it go out as they are.
        """
        ray = self.workers.ray
        lost: list[Chunk] = []
        for r in slot.in_flight if ref in slot.in_flight else [ref, *slot.in_flight]:
            c = chunk if r == ref else pending.pop(r)[1]
            if r != ref and ray.wait([r], timeout=0)[0]:
                try:  # finished before the worker died: its results are safe with the driver
                    self._commit_chunk(c, ray.get(r), queue, commit, stopping)
                    continue
                except ray.exceptions.RayError:
                    pass
            lost.append(c)
        slot.in_flight = []
        if stopping:
            self.workers.replace(slot, reason, relaunch=False)
            return
        log.warning(
            "Ray worker %s (pid %s on %s) died: %s; reissuing %d chunk(s) of %d rows",
            slot.name,
            slot.info.get("pid"),
            slot.info.get("host"),
            reason,
            len(lost),
            sum(len(c.tasks) for c in lost),
        )
        for n, lost_chunk in enumerate(reversed(lost)):  # the running one goes out first
            if n == len(lost) - 1:
                self._retry(lost_chunk, reason, queue, commit)
            else:
                queue.append(lost_chunk)
        self.stats.chunks_reissued += len(lost)
        self.workers.replace(slot, reason)

    def _retry(
        self,
        chunk: Chunk,
        reason: str,
        queue: deque[Chunk],
        commit: Callable[[list[Result]], None],
    ) -> None:
        again, errors = after_failure(chunk, reason, self._new_chunk_id)
        queue.extend(again)  # the next to go out
        if errors:
            commit(errors)

    def _new_chunk_id(self) -> int:
        self._next_chunk += 1
        return self._next_chunk - 1

    def _drain(
        self, pending: dict[Any, tuple[Slot, Chunk]], commit: Callable[[list[Result]], None]
    ) -> None:
        """Stopping: workers finish their decode step and return what they have; commit it."""
        ray = self.workers.ray
        for slot in self.workers.slots:
            if slot.started:
                slot.actor.stop.options(concurrency_group="control").remote()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while pending and time.monotonic() < deadline:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            for ref in done:
                self._collect(ref, pending, deque(), commit, stopping=True)
        for ref in list(pending):  # dropped: the next run generates these rows
            pending.pop(ref)
            with contextlib.suppress(Exception):  # already gone
                ray.cancel(ref)
