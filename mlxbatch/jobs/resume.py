"""What a run over an input it has seen before can skip: the input check, and the done rows.

An input's fingerprint hashes the file's bytes, the settings that decide what its rows are and
mean (everything in the JobSpec but how the run goes: paths, windows, batch sizes, stopping),
the schema files they name and mlxbatch's version. The store keeps the last passed check
under it, so a resume of an unchanged input does not validate a million rows again. The
manifest is kept under a second fingerprint that adds the tokenizer and model
(render.render_identity); when it matches, the rows whose every sample has a successful result
are not even parsed: the run reads only the rest (`ResumePoint.skip`), numbered as before.

A grown or edited input, other settings or another model get neither: the full check runs
and the manifest is written again (the store's `rendered` table still spares re-rendering).
Nothing here loads a model or decides what to generate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from mlxbatch import __version__
from mlxbatch.jobs.inputs import InputCheck
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.jobs.store import Store, StoreError

# How a run goes, not what its rows are or mean: changing one keeps the fingerprint.
RUN_FIELDS = frozenset(
    {"output", "store", "window", "checkpoint_every", "fresh", "max_errors", "quiet",
     "batch_size", "prefill_batch_size", "prefix_cache", "ray", "ray_workers", "executor",
     "deadline"}
)  # fmt: skip
_CHUNK = 1 << 20


def input_fingerprint(spec: JobSpec) -> str | None:
    """A digest of the input file and everything its check depends on; None if unreadable."""
    settings = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RUN_FIELDS}
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps([__version__, settings], sort_keys=True, default=str).encode())
    try:
        for path in (spec.input, spec.input_schema, spec.json_schema):
            if path is not None:
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                digest.update(b"\0" + str(os.path.getsize(path)).encode())
    except OSError:
        return None
    return digest.hexdigest()


def recorded_check(spec: JobSpec, fingerprint: str | None) -> InputCheck | None:
    """The check a run over this very input already passed, from the store; else None (and
    always None with --fresh, which ignores the store)."""
    if spec.fresh or fingerprint is None or not os.path.exists(spec.store_path):
        return None
    try:
        store = Store(spec.store_path, create=False, read_only=True)
    except StoreError:
        return None  # a damaged store is dealt with when the run opens it
    try:
        recorded = json.loads(store.meta("input_check") or "{}")
    except (StoreError, ValueError):  # a store from before `meta`
        return None
    finally:
        store.close()
    if recorded.pop("fingerprint", None) != fingerprint:
        return None
    return InputCheck(kind=recorded["kind"], requests=recorded["requests"], tasks=recorded["tasks"])


def record_check(store: Store, check: InputCheck, fingerprint: str | None) -> None:
    if fingerprint is not None:
        store.set_meta("input_check", json.dumps({"fingerprint": fingerprint, **vars(check)}))


def manifest_fingerprint(input_fingerprint: str | None, render_identity: bytes) -> str | None:
    if input_fingerprint is None:
        return None
    return hashlib.blake2b(input_fingerprint.encode() + render_identity, digest_size=20).hexdigest()


@dataclass
class ResumePoint:
    """Where a run over an unchanged input picks up, from the manifest an earlier run wrote.

    Requests on lines up to `last_line` keep their numbers: those in `redo` (line -> first
    seq) are read again, the others are done and skipped. Lines after it are numbered from
    `next_seq`. `done_tasks` counts the skipped tasks.
    """

    last_line: int
    next_seq: int
    done_tasks: int
    redo: dict[int, int] = field(default_factory=dict)

    def skip(self, line: int) -> bool:
        return line <= self.last_line and line not in self.redo


def resume_point(store: Store, fingerprint: str | None, fresh: bool) -> ResumePoint | None:
    """The done rows to skip when the manifest was written for `fingerprint`; else None, and
    the manifest is emptied for this run to write under it."""
    if fresh or fingerprint is None or store.meta("manifest") != fingerprint:
        store.restart_manifest(fingerprint)
        return None
    last_line, next_seq = store.manifest_extent()
    redo = store.manifest_requests_to_redo()
    return ResumePoint(
        last_line=last_line,
        next_seq=next_seq,
        done_tasks=next_seq - sum(n for _, _, n in redo),
        redo={line: seq for line, seq, _ in redo},
    )
