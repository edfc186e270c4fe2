"""Parquet output reads unchanged with pyarrow, pandas and Hugging Face `datasets`."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import mlxbatch.jobs.export_parquet as export_parquet
from mlxbatch.cli import cli
from tests.conftest import write_jsonl


def run(tmp_path, model: str, src, *args: str):
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(
        cli,
        ["process", str(src), "-m", model, "--max-tokens", "3", "-o", str(out), "-q", *args],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(export_parquet, "PARQUET_CHUNK", 2)


def test_failures_after_the_first_chunk_keep_their_error_columns(
    tmp_path, tiny_model, small_chunks
):
    """error_code is null all through the first chunk; a later failed row still writes."""
    rows = [{"id": f"r{i}", "prompt": f"hello {i}"} for i in range(4)]
    rows.append({"id": "bad", "prompt": "x", "temprature": 1})
    out = run(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows), "--max-errors", "1")
    table = pq.read_table(out)
    assert table.schema.field("error_code").type == pa.string()
    assert table.schema.field("completion_tokens").type == pa.int64()
    assert table.column("error_code").to_pylist() == [None] * 4 + ["unsupported_parameter"]
    assert table.column("id").to_pylist() == [r["id"] for r in rows]


def test_parquet_input_columns_keep_their_types(tmp_path, tiny_model, small_chunks):
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table(
            {
                "text": ["a", "b", "c", "d", "e"],
                "note": pa.array([None, None, "x", None, "y"], pa.string()),
                "score": pa.array([1.5, 2.0, None, 4.0, 5.0], pa.float32()),
            }
        ),
        src,
    )
    out = run(tmp_path, tiny_model, src, "--template", "Say {{ text }}")
    table = pq.read_table(out)
    assert table.schema.field("note").type == pa.string()
    assert table.schema.field("score").type == pa.float32()
    assert table.column("note").to_pylist() == [None, None, "x", None, "y"]


def test_pandas_reads_the_output(tmp_path, tiny_model):
    pd = pytest.importorskip("pandas")
    rows = [{"id": f"r{i}", "prompt": f"hello {i}", "n": 1} for i in range(3)]
    out = run(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows))
    frame = pd.read_parquet(out)
    assert list(frame["id"]) == ["r0", "r1", "r2"]
    assert list(frame.columns) == pq.read_table(out).column_names
    assert frame["completion_tokens"].tolist() == [3, 3, 3]
    assert frame["error_code"].isna().all()
    assert frame.equals(pq.read_table(out).to_pandas())


def test_datasets_loads_the_output(tmp_path, tiny_model):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": f"r{i}", "prompt": f"hello {i}"} for i in range(3)]
    out = run(tmp_path, tiny_model, write_jsonl(tmp_path / "in.jsonl", rows))
    loaded = datasets.load_dataset(
        "parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded.column_names == pq.read_table(out).column_names
    assert loaded["id"] == ["r0", "r1", "r2"]
    assert loaded.features["error_code"].dtype == "string"
