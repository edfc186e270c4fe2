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

Ray is imported only here, and only when a run asks for it (`--ray`, `ray:` or
`executor: ray`): `pip install 'mlxbatch[ray]'`. How a window is cut into chunks, and what
becomes of a chunk whose worker died, is in chunks.py; the actor itself in ray_worker.py;
reaching the cluster and planning the workers in ray_connect.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlxbatch.jobs.chunks import Chunk, after_failure, split_chunks
from mlxbatch.jobs.ray_connect import (
    RayExecutorError,
    connect,
    failure_reason,
    worker_plan,
)
from mlxbatch.jobs.ray_worker import Worker
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.records import Result, Task

log = logging.getLogger("mlxbatch.ray")

IN_FLIGHT_PER_WORKER = 2  # the next chunk waits in the actor's queue: no idle round trip
STOP_GRACE_SECONDS = 20.0  # after a signal, how long finished work may take to come back
STARTUP_NOTICE_SECONDS = 60.0


@dataclass
class _Slot:
    """One actor and the chunks submitted to it, oldest (the running one) first."""

    actor: Any
    name: str
    ready: Any  # ObjectRef of `info`, until the model is loaded
    info: dict = field(default_factory=dict)
    in_flight: list[Any] = field(default_factory=list)  # ObjectRefs, in submission order

    @property
    def started(self) -> bool:
        return self.ready is None


@dataclass
class PoolStats:
    workers_started: int = 0
    workers_lost: int = 0
    chunks: int = 0
    chunks_reissued: int = 0


class RayPool:
    """A pool of `Worker` actors with the signature of `dispatch.generate_window`.

    Nothing is started until the first window with work: a finished job never touches Ray.
    `close()` ends the actors (and the local Ray instance, if this pool started it).
    """

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.address = spec.ray_address or "auto"
        self.stats = PoolStats()
        self._ray: Any = None
        self._started_ray = False
        self._actor_class: Any = None
        self._options: dict[str, Any] = {}
        self._slots: list[_Slot] = []
        self._identity: str | None = None
        self._tag = uuid.uuid4().hex[:8]
        self._next_chunk = 0
        self._replacements_left = 0
        self._committed: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    def _start(self, identity: str) -> Any:
        if self._ray is not None:
            return self._ray
        ray, self._started_ray = connect(self.address, quiet=self.spec.quiet)
        self._ray = ray
        self._identity = identity
        count, options = worker_plan(ray, self.spec.ray_workers)
        self._options = options
        remote: Any = ray.remote  # its type hints lack concurrency_groups
        self._actor_class = remote(concurrency_groups={"control": 1})(Worker)
        self._replacements_left = 8 + 2 * count
        for _ in range(count):
            self._launch()
        return ray

    def _launch(self) -> None:
        name = f"mlxbatch-worker-{self._tag}-{self.stats.workers_started}"
        actor = self._actor_class.options(
            name=name, max_restarts=0, max_task_retries=0, **self._options
        ).remote(self.spec)
        ready = actor.info.options(concurrency_group="control").remote()
        self._slots.append(_Slot(actor, name, ready))
        self.stats.workers_started += 1

    def close(self) -> None:
        if self._ray is None:
            return
        for slot in self._slots:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(slot.actor)
        self._slots = []
        if self._started_ray:
            self._ray.shutdown()
        self._ray = None

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

        chunks = split_chunks(todo, len(self._slots), self._next_chunk)
        self._next_chunk += len(chunks)
        self.stats.chunks += len(chunks)
        # Chunks go out from the right: longest prompts first, so the window's end is short;
        # a reissued chunk is appended on the right, to go out next.
        queue = deque(chunks)
        pending: dict[Any, tuple[_Slot, Chunk]] = {}
        waiting_since = time.monotonic()
        while (queue or pending) and not should_stop():
            self._submit(queue, pending)
            refs = list(pending) + [s.ready for s in self._slots if not s.started]
            if not refs:
                raise RayExecutorError("no Ray worker is left to generate on")
            done, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in done:
                if ref in pending:
                    self._collect(ref, pending, queue, commit)
                elif any(s.ready == ref for s in self._slots):
                    self._started(ref)
            if pending or any(s.started for s in self._slots):
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

    def _submit(self, queue: deque[Chunk], pending: dict[Any, tuple[_Slot, Chunk]]) -> None:
        for slot in self._slots:
            while slot.started and queue and len(slot.in_flight) < IN_FLIGHT_PER_WORKER:
                chunk = queue.pop()
                ref = slot.actor.generate.remote(chunk.tasks)
                slot.in_flight.append(ref)
                pending[ref] = (slot, chunk)

    def _started(self, ready: Any) -> None:
        slot = next(s for s in self._slots if s.ready == ready)
        try:
            info = self._ray.get(ready)
        except self._ray.exceptions.RayError as e:
            if "creation task" in str(e):  # its __init__ raised: the model did not load
                raise RayExecutorError(
                    f"a Ray worker could not load the model: {failure_reason(e)}"
                ) from None
            self._replace(slot, failure_reason(e))  # killed while loading: like any other death
            return
        if info["identity"] != self._identity:
            raise RayExecutorError(
                f"the Ray worker on {info['host']} loaded {self.spec.model} as a different model "
                f"(dtype {info['dtype']}; other weights, config or adapter) than this process: "
                "its results would not match their keys. Give every machine the same model "
                "files and pass --dtype explicitly"
            )
        slot.info, slot.ready = info, None
        log.debug("Ray worker %s ready: pid %s on %s", slot.name, info["pid"], info["host"])

    def _collect(
        self,
        ref: Any,
        pending: dict[Any, tuple[_Slot, Chunk]],
        queue: deque[Chunk],
        commit: Callable[[list[Result]], None],
        *,
        stopping: bool = False,
    ) -> None:
        ray = self._ray
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
        slot: _Slot,
        ref: Any,
        chunk: Chunk,
        pending: dict[Any, tuple[_Slot, Chunk]],
        queue: deque[Chunk],
        commit: Callable[[list[Result]], None],
        reason: str,
        stopping: bool,
    ) -> None:
        """A worker died: commit what it had finished, reissue the rest, replace it.

        Its chunks ran in submission order: the first unfinished one was running when it died
        and counts a failure against its rows; the ones queued behind it go out as they are.
        """
        ray = self._ray
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
            self._replace(slot, reason, relaunch=False)
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
        self._replace(slot, reason)

    def _replace(self, slot: _Slot, reason: str, relaunch: bool = True) -> None:
        """Drop a dead worker; start a fresh one in its place while the budget lasts."""
        if slot not in self._slots:
            return
        self._slots.remove(slot)
        self.stats.workers_lost += 1
        with contextlib.suppress(Exception):  # already gone
            self._ray.kill(slot.actor)
        if not relaunch:
            return
        if self._replacements_left <= 0:
            raise RayExecutorError(
                f"Ray workers died {self.stats.workers_lost} times (last: {reason}); finished "
                "rows are in the store: run the same command again to resume"
            )
        self._replacements_left -= 1
        self._launch()

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
        self, pending: dict[Any, tuple[_Slot, Chunk]], commit: Callable[[list[Result]], None]
    ) -> None:
        """Stopping: workers finish their decode step and return what they have; commit it."""
        ray = self._ray
        for slot in self._slots:
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
