"""The store records which manifest seqs hold a successful result as spans, and a resume looks
up only the seqs between them (jobs/spans.py, Store.record_done)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mlxbatch.jobs.spans import gaps_between, spans_of
from mlxbatch.jobs.store import Store
from tests.conftest import write_jsonl
from tests.test_cli_process import generated_count, process, prompts
from tests.test_resume_point import ARGS, counted  # noqa: F401 (a fixture)


@pytest.mark.parametrize(
    ("seqs", "spans"),
    [([], []), ([4], [(4, 4)]), ([0, 1, 2, 5, 6, 9], [(0, 2), (5, 6), (9, 9)]),
     ([1, 1, 2, 2, 3], [(1, 3)])],
)  # fmt: skip
def test_spans_of_sorted_seqs(seqs, spans):
    assert spans_of(seqs) == spans


@pytest.mark.parametrize(
    ("spans", "end", "gaps"),
    [([], 3, [(0, 2)]), ([], 0, []), ([(0, 2), (5, 6)], 10, [(3, 4), (7, 9)]),
     ([(0, 9)], 5, []), ([(2, 3)], 2, [(0, 1)]), ([(0, 5), (2, 3), (4, 8)], 10, [(9, 9)]),
     ([(3, 4), (8, 20)], 10, [(0, 2), (5, 7)])],
)  # fmt: skip
def test_gaps_between_spans(spans, end, gaps):
    assert list(gaps_between(spans, end)) == gaps


def store_with_manifest(path: Path, lines: int) -> Store:
    """A store whose manifest holds one task per line (seq = line - 1) and no results."""
    store = Store(str(path))
    store.db.executemany(
        "INSERT INTO manifest VALUES (?, ?, ?, NULL, 0, 1, ?, NULL)",
        [(line - 1, line, f'"r{line}"', f"k{line}") for line in range(1, lines + 1)],
    )
    return store


def redo_lines(store: Store) -> list[int]:
    return [line for line, _, _ in store.manifest_requests_to_redo()]


def test_seqs_inside_done_spans_are_not_looked_up(tmp_path):
    store = store_with_manifest(tmp_path / "s.sqlite", 8)
    assert redo_lines(store) == [1, 2, 3, 4, 5, 6, 7, 8]
    # The spans are trusted: lines 2-4 and 7 have no result, yet are not looked up.
    store.record_done([], [6, 1, 2, 3])
    assert redo_lines(store) == [1, 5, 6, 8]
    store.record_done([], [4, 5])  # a later window's span, overlapping none
    assert redo_lines(store) == [1, 8]


@pytest.mark.parametrize("clear", ["restart_manifest", "clear_results"])
def test_spans_go_with_the_manifest_and_the_results(tmp_path, clear):
    store = store_with_manifest(tmp_path / "s.sqlite", 3)
    store.record_done([], [0, 1, 2])
    assert redo_lines(store) == []
    getattr(store, clear)(*([None] if clear == "restart_manifest" else []))
    assert store.db.execute("SELECT COUNT(*) FROM done_spans").fetchone() == (0,)


def done_seqs(store: Path) -> set[int]:
    with sqlite3.connect(store) as db:
        spans = db.execute("SELECT first_seq, last_seq FROM done_spans").fetchall()
    return {seq for first, last in spans for seq in range(first, last + 1)}


def test_a_row_that_failed_is_outside_the_spans_and_read_again(tmp_path, tiny_model, counted):  # noqa: F811
    rows = prompts(7)
    rows[2] = {"id": "bad", "prompt": "x", "temprature": 1}
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    args = [str(f), "-m", tiny_model, *ARGS, "--max-errors", "1"]
    assert process(*args, "-q").exit_code == 0
    store = tmp_path / "p.out.jsonl.mlxbatch.sqlite"
    assert done_seqs(store) == {0, 1, 3, 4, 5, 6}  # windows of 4: spans from two windows
    counted["parsed"].clear()
    again = process(*args)
    assert generated_count(again.stderr) == (6, 6)
    assert counted["parsed"] == [3]
