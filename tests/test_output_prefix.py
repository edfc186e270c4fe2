"""A run keeps its output's final leading lines as they are and writes only the rest
(jobs/output_prefix.py); the file comes out byte for byte as a full export would write it."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.jobs import export
from tests.conftest import write_jsonl
from tests.test_cli_process import process, prompts
from tests.test_openai_parity import line

ARGS = ["--max-tokens", "3", "--batch-size", "2", "--max-errors", "5", "-q"]


@pytest.fixture
def written(monkeypatch):
    """The manifest seqs whose output lines were written (not copied) while the test runs."""
    seqs: list[int] = []
    records = export._records

    def recording(store, openai_model, after=-1):
        for record, rows in records(store, openai_model, after):
            seqs.extend(r.seq for r in rows)
            yield record, rows

    monkeypatch.setattr(export, "_records", recording)
    return seqs


def openai_rows(n: int, start: int = 0) -> list[dict]:
    return [line(f"c{i}", n=2, temperature=0.7, seed=i) for i in range(start, start + n)]


@pytest.mark.parametrize("rows_of", [prompts, openai_rows], ids=["mlxbatch", "openai"])
def test_a_grown_input_has_only_its_new_lines_written(tmp_path, tiny_model, written, rows_of):
    f = write_jsonl(tmp_path / "p.jsonl", rows_of(6))
    assert process(str(f), "-m", tiny_model, *ARGS).exit_code == 0
    with open(f, "a", encoding="utf-8") as appending:
        appending.writelines(json.dumps(row) + "\n" for row in rows_of(3, start=6))
    written.clear()
    assert process(str(f), "-m", tiny_model, *ARGS).exit_code == 0
    samples = 2 if rows_of is openai_rows else 1
    key = "custom_id" if rows_of is openai_rows else "id"
    ids = [row[key] for row in rows_of(9)]
    assert written == list(range(6 * samples, 9 * samples))
    out = tmp_path / "p.out.jsonl"
    # `mlxbatch export` writes the whole file from the store.
    full = CliRunner().invoke(cli, ["export", str(out), "--to", str(tmp_path / "full.jsonl")])
    assert full.output == f"wrote 9 lines to {tmp_path / 'full.jsonl'}\n"
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert [json.loads(x)[key] for x in out.read_text().splitlines()] == ids


def test_a_row_not_final_ends_the_lines_kept(tmp_path, tiny_model, written):
    rows = prompts(6)
    rows[2] = {"id": "bad", "prompt": "x", "temprature": 1}  # an error record, tried again
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    assert process(str(f), "-m", tiny_model, *ARGS).exit_code == 0
    first = (tmp_path / "p.out.jsonl").read_bytes()
    written.clear()
    assert process(str(f), "-m", tiny_model, *ARGS).exit_code == 0
    assert written == [2, 3, 4, 5]
    assert (tmp_path / "p.out.jsonl").read_bytes() == first


@pytest.mark.parametrize(
    "change",
    [lambda b: b.replace(b'"r0"', b'"R0"'), lambda b: b[: len(b) // 2], lambda b: b""],
    ids=["edited", "cut", "emptied"],
)
def test_an_output_changed_since_is_written_in_full(tmp_path, tiny_model, written, change):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(5))
    out = tmp_path / "p.out.jsonl"
    assert process(str(f), "-m", tiny_model, *ARGS).exit_code == 0
    whole = out.read_bytes()
    out.write_bytes(change(whole))
    written.clear()
    assert process(str(f), "-m", tiny_model, *ARGS).exit_code == 0
    assert written == [0, 1, 2, 3, 4]
    assert out.read_bytes() == whole


def test_the_record_goes_with_the_manifest(tmp_path, tiny_model, written):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(4))
    args = [str(f), "-m", tiny_model, *ARGS]
    assert process(*args).exit_code == 0
    store = tmp_path / "p.out.jsonl.mlxbatch.sqlite"
    with sqlite3.connect(store) as db:
        [(value,)] = db.execute("SELECT value FROM meta WHERE name = 'export'").fetchall()
    assert json.loads(value)["seq"] == 3 and json.loads(value)["lines"] == 4
    write_jsonl(f, prompts(4)[::-1])  # the same rows in another order: a new manifest
    written.clear()
    assert process(*args).exit_code == 0
    assert written == [0, 1, 2, 3]
    assert [json.loads(x)["id"] for x in (tmp_path / "p.out.jsonl").read_text().splitlines()] == [
        "r3",
        "r2",
        "r1",
        "r0",
    ]
