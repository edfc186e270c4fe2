"""What a run over an input it has seen before can skip: the input check, and the done rows.

An input's fingerprint digests its bytes and, apart, its settings: everything in the JobSpec
but how the run goes (paths, windows, batch sizes, stopping), the schema files it names and
mlxbatch's version. The store keeps the last passed check under both, with every row's id, so
a resume of an unchanged input does not validate a million rows again, and a JSONL input only
appended to has only its new lines checked (their ids against those recorded).

The manifest is kept under the settings, the tokenizer and model (render.render_identity) and
the bytes it was written for: when they match, or the input has only grown by lines appended
to them (plain JSONL, the nightly case), the rows whose every sample has a successful result
are not even parsed; the run reads only the rest (`ResumePoint.skip`), numbered after them.
Which those are is looked up only outside the spans of seqs each window recorded as done
(Store.record_done).

Other settings, another model, or an input edited anywhere but at its end get neither: the full
check runs and the manifest is written again (the store's `rendered` table still spares
re-rendering). Nothing here loads a model or decides what to generate. Not guarded against: a
store last run by a version of mlxbatch from before these records, under other settings,
after this version ran it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field

from mlxbatch import __version__
from mlxbatch.jobs.file_digest import start_digest
from mlxbatch.jobs.inputs import InputCheck, check_appended
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.jobs.store import Store, StoreError

# How a run goes, not what its rows are or mean: changing one keeps the fingerprint.
RUN_FIELDS = frozenset(
    {"output", "store", "window", "checkpoint_every", "fresh", "max_errors", "quiet",
     "batch_size", "prefill_batch_size", "prefix_cache", "ray", "ray_workers", "executor",
     "deadline"}
)  # fmt: skip


@dataclass(frozen=True)
class Fingerprint:
    """`settings`: a digest of what the input's rows mean besides their bytes; `content`: of
    its `size` bytes, which hold `lines` newlines. `appendable`: plain JSONL, whose first
    lines survive an append. `starts`: digests of the file's first bytes by size, made once
    per run (the recorded check and the manifest both ask for the same one)."""

    settings: str
    content: str
    size: int
    appendable: bool
    lines: int = 0
    starts: dict[int, tuple[str, int] | None] = field(default_factory=dict, compare=False)


def input_fingerprint(spec: JobSpec) -> Fingerprint | None:
    """The input's fingerprint; None if a file it needs cannot be read."""
    settings = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RUN_FIELDS}
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps([__version__, settings], sort_keys=True, default=str).encode())
    try:
        for path in (spec.input_schema, spec.json_schema):
            if path is not None:
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
        size = os.path.getsize(spec.input)
    except OSError:
        return None
    content = content_digest(spec.input, size)
    if content is None:
        return None
    appendable = spec.input.lower().endswith((".jsonl", ".json", ".ndjson"))
    return Fingerprint(digest.hexdigest(), content[0], size, appendable, content[1])


def content_digest(path: str, size: int) -> tuple[str, int] | None:
    """A digest of the first `size` bytes of `path`, and how many newlines they hold; None
    if it cannot read them all."""
    start = start_digest(path, size)
    return (start[0].hexdigest(), start[1]) if start is not None else None


def recorded_check(spec: JobSpec, fingerprint: Fingerprint | None) -> InputCheck | None:
    """The check a run over this very input already passed, from the store; for a JSONL file
    only appended to since, that check and one of the new lines. Else None (and always None
    with --fresh, which ignores the store)."""
    if spec.fresh or fingerprint is None or not os.path.exists(spec.store_path):
        return None
    try:
        store = Store(spec.store_path, create=False, read_only=True)
    except StoreError:
        return None  # a damaged store is dealt with when the run opens it
    try:
        recorded = _json_object(store.meta("input_check"))
        key = recorded.get("fingerprint")
        if key == _check_key(fingerprint):
            return InputCheck(recorded["kind"], recorded["requests"], recorded["tasks"])
        grown = (
            isinstance(key, list)
            and len(key) == 3
            and key[0] == fingerprint.settings
            and (lines := _grown_from(key[2], key[1], spec.input, fingerprint)) is not None
            and lines == recorded.get("lines")
        )
        ids = _decoded_ids(store.meta("input_ids")) if grown else None
    except StoreError:  # a store from before `meta`
        return None
    finally:
        store.close()
    if ids is None or not isinstance(key, list):
        return None
    new = check_appended(spec, recorded["kind"], (key[2], recorded["lines"]), ids)
    if new is None:
        return None
    requests, tasks = recorded["requests"] + new.requests, recorded["tasks"] + new.tasks
    return InputCheck(recorded["kind"], requests, tasks, ids=ids + (new.ids or []))


def record_check(store: Store, check: InputCheck, fingerprint: Fingerprint | None) -> None:
    """Keep a check this run made (not one reused as it was), with its rows' ids."""
    if fingerprint is None or check.ids is None:
        return
    recorded = {"fingerprint": _check_key(fingerprint), "kind": check.kind,
                "requests": check.requests, "tasks": check.tasks,
                "lines": fingerprint.lines}  # fmt: skip
    values: dict[str, str | bytes] = {"input_check": json.dumps(recorded)}
    if fingerprint.appendable:  # only a file that can grow by lines needs them
        values["input_ids"] = zlib.compress(json.dumps(check.ids).encode(), 1)
    store.set_meta(values)
    check.ids = None  # a million ids are ~70 MB


def _decoded_ids(blob: str | bytes | None) -> list[str] | None:
    try:
        ids = json.loads(zlib.decompress(blob)) if isinstance(blob, bytes) else None
    except (zlib.error, ValueError):
        return None
    return ids if isinstance(ids, list) else None


def _json_object(text: str | bytes | None) -> dict:
    """A meta value as the dict this version writes; {} for anything else."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _check_key(fingerprint: Fingerprint) -> list:
    return [fingerprint.settings, fingerprint.content, fingerprint.size]


@dataclass
class ResumePoint:
    """Where a run over an unchanged (or appended-to) input picks up, from the manifest an
    earlier run wrote.

    Requests on lines up to `last_line` keep their numbers: those in `redo` (line -> first
    seq) are read again, the others are done and skipped. Lines after it are numbered from
    `next_seq`. `done_tasks` counts the skipped tasks. `after` = (offset, lines): when every
    line before that byte offset is done, reading starts there.
    """

    last_line: int
    next_seq: int
    done_tasks: int
    redo: dict[int, int] = field(default_factory=dict)
    after: tuple[int, int] = (0, 0)

    def skip(self, line: int) -> bool:
        return line <= self.last_line and line not in self.redo


def resume_point(
    store: Store, path: str, fingerprint: Fingerprint | None, identity: bytes, fresh: bool
) -> ResumePoint | None:
    """The done rows to skip when the store's manifest was written for the input at `path` as
    it is now, or for its first lines; else None, and the manifest is emptied for this run to
    write. Either way the manifest is recorded as this input's from here on."""
    if fingerprint is None:
        store.restart_manifest(None)
        return None
    current = {"settings": fingerprint.settings, "identity": identity.hex(),
               "content": fingerprint.content, "size": fingerprint.size}  # fmt: skip
    written = _json_object(store.meta("manifest"))
    lines = None if fresh else _written_lines(written, current, path, fingerprint)
    if lines is None:
        store.restart_manifest(json.dumps(current))
        return None
    if written != current:
        store.set_meta({"manifest": json.dumps(current)})
    last_line, next_seq = store.manifest_extent()
    redo = store.manifest_requests_to_redo()
    # The manifest ends at the written bytes' last line and all of it is done: skip past it.
    past = not redo and last_line == lines and fingerprint.appendable
    return ResumePoint(
        last_line=last_line,
        next_seq=next_seq,
        done_tasks=next_seq - sum(n for _, _, n in redo),
        redo={line: seq for line, seq, _ in redo},
        after=(written["size"], lines) if past else (0, 0),
    )


def _written_lines(written: dict, current: dict, path: str, fingerprint: Fingerprint) -> int | None:
    """If a manifest written for `written` holds the first requests of the input now, how
    many lines the bytes it was written for hold; else None."""
    if any(written.get(k) != current[k] for k in ("settings", "identity")):
        return None
    if written.get("size") == current["size"]:
        return fingerprint.lines if written.get("content") == current["content"] else None
    return _grown_from(written.get("size"), written.get("content"), path, fingerprint)


def _grown_from(size: object, content: object, path: str, fingerprint: Fingerprint) -> int | None:
    """If the input is a file of `size` bytes digesting to `content`, whole lines, with lines
    appended: how many lines those bytes hold. Else None."""
    if not (fingerprint.appendable and isinstance(size, int) and 0 < size < fingerprint.size):
        return None
    if size not in fingerprint.starts:
        fingerprint.starts[size] = content_digest(path, size) if _ends_a_line(path, size) else None
    start = fingerprint.starts[size]
    return start[1] if start is not None and start[0] == content else None


def _ends_a_line(path: str, size: int) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"
    except OSError:
        return False
