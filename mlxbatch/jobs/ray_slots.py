"""The Ray pool's workers: started, checked as they come up, replaced when they die, ended.

A slot is one `Worker` actor and the chunks submitted to it. Workers start at the first window
with work (`start`), each loading the model once; one whose model is not this process's model
(another identity: other weights, dtype or adapter) stops the run. A dead worker is replaced
by a fresh one while the budget of replacements lasts. It does not decide what a worker runs or
commit anything (ray_executor.py does).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlxbatch.jobs.ray_connect import RayExecutorError, connect, failure_reason, worker_plan
from mlxbatch.jobs.ray_worker import Worker
from mlxbatch.jobs.spec import JobSpec

log = logging.getLogger("mlxbatch.ray")


@dataclass
class Slot:
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


class WorkerSlots:
    """The pool's live workers (`slots`) and the Ray connection they run on (`ray`)."""

    def __init__(self, spec: JobSpec, stats: PoolStats):
        self.spec, self.stats = spec, stats
        self.ray: Any = None
        self.slots: list[Slot] = []
        self._started_ray = False
        self._actor_class: Any = None
        self._options: dict[str, Any] = {}
        self._identity: str | None = None
        self._tag = uuid.uuid4().hex[:8]
        self._replacements_left = 0

    def start(self, identity: str) -> Any:
        """Connect (or start a local Ray) and launch the planned workers, once."""
        if self.ray is not None:
            return self.ray
        ray, self._started_ray = connect(self.spec.ray_address or "auto", quiet=self.spec.quiet)
        self.ray, self._identity = ray, identity
        count, self._options = worker_plan(ray, self.spec.ray_workers)
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
        self.slots.append(Slot(actor, name, ready))
        self.stats.workers_started += 1

    def close(self) -> None:
        if self.ray is None:
            return
        for slot in self.slots:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(slot.actor)
        self.slots = []
        if self._started_ray:
            self.ray.shutdown()
        self.ray = None

    def loading(self) -> list[Any]:
        """The `info` refs of workers still loading the model."""
        return [s.ready for s in self.slots if not s.started]

    def any_started(self) -> bool:
        return any(s.started for s in self.slots)

    def on_ready(self, ready: Any) -> None:
        """Take a worker's `info` (one of `loading()`) once its model loaded."""
        slot = next(s for s in self.slots if s.ready == ready)
        try:
            info = self.ray.get(ready)
        except self.ray.exceptions.RayError as e:
            if "creation task" in str(e):  # its __init__ raised: the model did not load
                raise RayExecutorError(
                    f"a Ray worker could not load the model: {failure_reason(e)}"
                ) from None
            self.replace(slot, failure_reason(e))  # killed while loading: like any other death
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

    def replace(self, slot: Slot, reason: str, relaunch: bool = True) -> None:
        """Drop a dead worker; start a fresh one in its place while the budget lasts."""
        if slot not in self.slots:
            return
        self.slots.remove(slot)
        self.stats.workers_lost += 1
        with contextlib.suppress(Exception):  # already gone
            self.ray.kill(slot.actor)
        if not relaunch:
            return
        if self._replacements_left <= 0:
            raise RayExecutorError(
                f"Ray workers died {self.stats.workers_lost} times (last: {reason}); finished "
                "rows are in the store: run the same command again to resume"
            )
        self._replacements_left -= 1
        self._launch()
