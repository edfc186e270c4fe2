"""A run keeps its Parquet output's final leading row groups and builds only the rows after
them (jobs/parquet_prefix.py); the file comes out byte for byte as a full export writes it."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import mlxbatch.jobs.export_parquet as export_parquet
from mlxbatch.cli import cli
from tests.conftest import write_jsonl
from tests.test_cli_process import process, prompts

ARGS = ["--max-tokens", "3", "--batch-size", "2", "--max-errors", "5", "-q"]


@pytest.fixture
def built(monkeypatch):
    """The manifest seqs whose output rows were built from the store, and the input lines
    read, while the test runs."""
    seen: dict[str, list[int]] = {"seqs": [], "lines": []}
    record, read = export_parquet.output_record, export_parquet.read_rows

    def recording(row):
        seen["seqs"].append(row.seq)
        return record(row)

    def reading(*args, **kwargs):
        for row in read(*args, **kwargs):
            seen["lines"].append(row.line)
            yield row

    monkeypatch.setattr(export_parquet, "output_record", recording)
    monkeypatch.setattr(export_parquet, "read_rows", reading)
    monkeypatch.setattr(export_parquet, "PARQUET_CHUNK", 2)
    return seen


def run(f, out, model: str, *args: str) -> None:
    assert process(str(f), "-m", model, "-o", str(out), *ARGS, *args).exit_code == 0


def append(f, rows: list[dict]) -> None:
    with open(f, "a", encoding="utf-8") as appending:
        appending.writelines(json.dumps(row) + "\n" for row in rows)


def assert_full_export(tmp_path, out, rows: int) -> None:
    full = tmp_path / "full.parquet"
    result = CliRunner().invoke(cli, ["export", str(out), "--to", str(full)])
    assert result.output == f"wrote {rows} lines to {full}\n"
    assert out.read_bytes() == full.read_bytes()


def test_a_grown_input_has_only_its_new_rows_built(tmp_path, tiny_model, built):
    f, out = write_jsonl(tmp_path / "p.jsonl", prompts(5)), tmp_path / "out.parquet"
    run(f, out, tiny_model)
    append(f, prompts(3, start=5))
    built["seqs"].clear(), built["lines"].clear()
    run(f, out, tiny_model)
    # Two whole row groups of two rows were final: rows 0-3 kept, row 4 built again.
    assert built["seqs"] == [4, 5, 6, 7]
    assert built["lines"] == [4, 5, 6, 7, 8]  # line 4 holds row 3, the last kept
    assert_full_export(tmp_path, out, 8)
    assert pq.read_table(out).column("id").to_pylist() == [f"r{i}" for i in range(8)]
    append(f, prompts(1, start=8))
    built["seqs"].clear()
    run(f, out, tiny_model)
    assert built["seqs"] == [8]
    assert_full_export(tmp_path, out, 9)


def test_samples_of_one_line_on_both_sides_of_the_kept_rows(tmp_path, tiny_model, built):
    f, out = write_jsonl(tmp_path / "p.jsonl", prompts(3)), tmp_path / "out.parquet"
    args = ["-n", "3", "--temperature", "0.7", "--seed", "1"]
    run(f, out, tiny_model, *args)
    append(f, prompts(1, start=3))
    built["seqs"].clear(), built["lines"].clear()
    run(f, out, tiny_model, *args)
    # 9 final rows: 8 kept, the third sample of line 3 built again with its input columns.
    assert built["seqs"] == [8, 9, 10, 11]
    assert built["lines"] == [3, 4]
    assert_full_export(tmp_path, out, 12)


def test_a_row_not_final_ends_the_rows_kept(tmp_path, tiny_model, built):
    rows = prompts(6)
    rows[3] = {"id": "bad", "prompt": "x", "temprature": 1}  # an error record, tried again
    f, out = write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "out.parquet"
    run(f, out, tiny_model)
    first = out.read_bytes()
    built["seqs"].clear()
    run(f, out, tiny_model)
    assert built["seqs"] == [2, 3, 4, 5]
    assert out.read_bytes() == first


def _recompressed(out) -> None:
    pq.write_table(pq.read_table(out), out, compression="gzip")  # the same rows, other bytes


def _edited(out) -> None:
    # A value changed in place: the same size, so only the digest tells.
    size = out.stat().st_size
    data = out.read_bytes()
    assert b"r1" in data
    out.write_bytes(data.replace(b"r1", b"R1"))
    assert out.stat().st_size == size and pq.read_table(out).column("id")[1].as_py() == "R1"


@pytest.mark.parametrize("change", [_recompressed, _edited], ids=["recompressed", "edited"])
def test_an_output_changed_since_is_written_in_full(tmp_path, tiny_model, built, change):
    f, out = write_jsonl(tmp_path / "p.jsonl", prompts(4)), tmp_path / "out.parquet"
    run(f, out, tiny_model)
    whole = out.read_bytes()
    change(out)
    built["seqs"].clear()
    run(f, out, tiny_model)
    assert built["seqs"] == [0, 1, 2, 3]
    assert out.read_bytes() == whole


def test_the_record_goes_with_the_manifest(tmp_path, tiny_model, built):
    f, out = write_jsonl(tmp_path / "p.jsonl", prompts(4)), tmp_path / "out.parquet"
    run(f, out, tiny_model)
    write_jsonl(f, prompts(4)[::-1])  # the same rows in another order: a new manifest
    built["seqs"].clear()
    run(f, out, tiny_model)
    assert built["seqs"] == [0, 1, 2, 3]
    assert pq.read_table(out).column("id").to_pylist() == ["r3", "r2", "r1", "r0"]


def test_a_parquet_input_skips_the_kept_rows_lines(tmp_path, tiny_model, built):
    def table(n: int) -> pa.Table:
        rows = prompts(n)
        return pa.table({"id": [r["id"] for r in rows], "prompt": [r["prompt"] for r in rows]})

    f, out = tmp_path / "p.parquet", tmp_path / "out.parquet"
    pq.write_table(table(5), f)
    run(f, out, tiny_model)
    built["seqs"].clear(), built["lines"].clear()
    run(f, out, tiny_model)
    assert built["seqs"] == [4] and built["lines"] == [4, 5]
    assert_full_export(tmp_path, out, 5)
    # A Parquet file cannot grow by appended bytes: a new one is read whole (resume.py), its
    # manifest written again, and the output with it.
    pq.write_table(table(7), f)
    built["seqs"].clear()
    run(f, out, tiny_model)
    assert built["seqs"] == list(range(7))
    assert_full_export(tmp_path, out, 7)
