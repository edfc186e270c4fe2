"""The input as keyed Tasks, a window of rows at a time, in output order.

Each window of validated requests is rendered to tasks (pipeline/render.py). With a store,
rows whose task keys an earlier run recorded, and whose results are all stored, are not
rendered or tokenized again: a resumed or nightly run over a large file then spends its
time before generating on reading the file, not on re-rendering what is done. It does not
decide what to generate (runner.py does) and loads no model.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from mlxbatch.jobs.inputs import iter_requests
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.jobs.store import Store
from mlxbatch.pipeline.render import render_identity, render_tasks, request_digest
from mlxbatch.records import Request, Task


def task_windows(
    spec: JobSpec, kind: str, engine: Any, store: Store | None = None
) -> Iterator[list[Task]]:
    """The input's keyed tasks, a window of rows at a time, numbered in output order."""
    options: dict[str, Any] = dict(
        model_identity=engine.identity,
        template=spec.template,
        system=spec.system,
        use_chat_template=spec.chat_template,
    )
    identity = render_identity(engine.tokenizer, **options) if store is not None else b""
    seq = 0
    for window in _windows(iter_requests(spec, kind), spec.window):
        digests: list[bytes | None] = [None] * len(window)
        known: dict[int, list[str]] = {}
        if store is not None:
            digests = [request_digest(r, identity) if r.error is None else None for r in window]
            known = _done_renders(store, digests)
        tasks = render_tasks(window, engine.tokenizer, first_seq=seq, known_keys=known, **options)
        if store is not None:
            store.put_rendered(_new_renders(window, digests, known, tasks))
        seq += len(tasks)
        yield tasks


def _windows(requests: Iterator[Request], size: int) -> Iterator[list[Request]]:
    while window := list(islice(requests, size)):
        yield window


def _done_renders(store: Store, digests: list[bytes | None]) -> dict[int, list[str]]:
    """Request index -> task keys, for requests rendered before whose results are all stored."""
    recorded = store.rendered_keys([d for d in digests if d is not None])
    done = store.done_keys(k for keys in recorded.values() for k in keys)
    return {
        i: recorded[d]
        for i, d in enumerate(digests)
        if d in recorded and all(k in done for k in recorded[d])
    }


def _new_renders(
    window: list[Request],
    digests: list[bytes | None],
    known: dict[int, list[str]],
    tasks: list[Task],
) -> list[tuple[bytes, list[str]]]:
    """(digest, task keys) of each request rendered just now without an error."""
    pairs = []
    start = 0
    for i, (request, digest) in enumerate(zip(window, digests, strict=True)):
        mine = tasks[start : start + request.params.n]
        start += request.params.n
        if digest is not None and i not in known and all(t.error is None for t in mine):
            pairs.append((digest, [t.key for t in mine]))
    return pairs
