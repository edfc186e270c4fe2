"""The input as keyed Tasks, a window of rows at a time, in output order.

Each window of validated requests is rendered to tasks (pipeline/render.py). With a
`ResumePoint` (resume.py: an unchanged or appended-to input), the rows it says are done are
not read at all. Otherwise, with a store, requests recorded there as done (`completed_renders`,
after their window is generated) are not rendered or tokenized again, and one lookup per row
tells: a run over an edited file spends its time before generating on reading it, not on
re-rendering what is done. It does not decide what to generate (runner.py does) and loads no
model.

`ReadAhead` prepares the next window on a worker thread while the caller generates the
current one: MLX lets go of Python's lock while it waits for the device, and rendering and
tokenizing 512 labelling rows took 0.066 s on an H200's host (~1.3 s a window of 10,000)
while the device waited.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, Generic, TypeVar

from mlxbatch.jobs.inputs import iter_requests
from mlxbatch.jobs.resume import ResumePoint
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.jobs.store import Store
from mlxbatch.pipeline.render import render_identity, render_tasks, request_digest
from mlxbatch.records import Request, Task

T = TypeVar("T")
READ_AHEAD = True  # prepare the next window while the current one generates (ReadAhead)


def render_options(spec: JobSpec, engine: Any) -> dict[str, Any]:
    """What rendering a request to token ids depends on besides the request."""
    return dict(
        model_identity=engine.identity,
        template=spec.template,
        system=spec.system,
        use_chat_template=spec.chat_template,
    )


def task_windows(
    spec: JobSpec,
    kind: str,
    engine: Any,
    store_path: str | None = None,
    resume: ResumePoint | None = None,
    identity: bytes | None = None,
) -> Iterator[list[Task]]:
    """The input's keyed tasks, a window of rows at a time, numbered in output order.

    With `store_path`, rows recorded there as done are not rendered again; the store is read
    through a read-only connection of its own, so the windows may be made on another thread.
    `identity` is the render identity when the caller has it (it reads the whole vocabulary).
    With `resume`, the rows it says are done are not read at all and the rest keep their
    numbers.
    """
    options = render_options(spec, engine)
    if identity is None:
        identity = render_identity(engine.tokenizer, **options) if store_path is not None else b""
    # The run's own connection holds the store in WAL mode, so this one reads what it commits.
    store = Store(store_path, create=False, read_only=True) if store_path is not None else None
    if resume is not None:
        requests = iter_requests(spec, kind, resume.skip, resume.after)
    else:
        requests = iter_requests(spec, kind)
    seq = resume.next_seq if resume is not None else 0
    try:
        for window in _windows(requests, spec.window):
            seqs = []
            for r in window:
                kept = resume.redo.get(r.line) if resume is not None else None
                seqs.append(seq if kept is None else kept)
                seq += r.params.n if kept is None else 0
            digests: list[bytes | None] = [None] * len(window)
            known: dict[int, list[str]] = {}
            if store is not None:
                digests = [request_digest(r, identity) if r.error is None else None for r in window]
                recorded = store.rendered_keys([d for d in digests if d is not None])
                known = {i: recorded[d] for i, d in enumerate(digests) if d in recorded}
            yield render_tasks(
                window, engine.tokenizer, seqs=seqs, known_keys=known, digests=digests, **options
            )
    finally:
        if store is not None:
            store.close()


class ReadAhead(Generic[T]):
    """The items of `items`, each made on one worker thread; `prepare_next` has the worker
    start on the next while the caller works on the current one.

    Only on request: windows that are all done (an edited input's) need little of the caller, and
    two threads then only fight over Python's lock (a 200,000-row resume started generating
    6.0 s in sequentially, 7.0 s reading ahead, 2 cores). At most two items are alive at once.
    Every step of `items`, closing included, runs on the worker (a SQLite connection stays in
    the thread that opened it); what it raises is raised by `next`.
    """

    def __init__(self, items: Iterator[T]):
        self._items = items
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="mlxbatch-windows")
        self._upcoming: Future[list[T]] | None = None

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        upcoming = self._upcoming or self._worker.submit(_take_one, self._items)
        self._upcoming = None
        item = upcoming.result()
        if not item:
            raise StopIteration
        return item[0]

    def prepare_next(self) -> None:
        if READ_AHEAD and self._upcoming is None:
            self._upcoming = self._worker.submit(_take_one, self._items)

    def close(self) -> None:
        """Close `items` once the item being made, if any, is done."""
        close = getattr(self._items, "close", None)
        if close is not None:
            self._worker.submit(close).result()
        self._worker.shutdown()


def _take_one(items: Iterator[T]) -> list[T]:
    """The next item, in a list; empty at the end."""
    return list(islice(items, 1))


def _windows(requests: Iterator[Request], size: int) -> Iterator[list[Request]]:
    while window := list(islice(requests, size)):
        yield window


def completed_renders(tasks: list[Task], done: set[str]) -> list[tuple[bytes, list[str]]]:
    """(digest, task keys) of the requests rendered in this window whose keys are all in
    `done` (those with a successful result).

    Only these go into the store's `rendered` table, so a request found there needs nothing.
    """
    samples: dict[bytes, dict[int, str]] = {}
    for t in tasks:
        if t.digest is not None and not t.done and t.error is None:
            samples.setdefault(t.digest, {})[t.sample_index] = t.key
    keys = {d: [by_index[i] for i in range(len(by_index))] for d, by_index in samples.items()}
    return [(d, ks) for d, ks in keys.items() if done.issuperset(ks)]
