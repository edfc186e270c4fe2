"""`mlxbatch doctor` and `--quantize`."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mlxbatch.cli import cli
from tests.conftest import read_jsonl, write_jsonl


def test_doctor_reports_versions_device_and_blas():
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert {"python", "mlx", "mlx-lm", "device", "device_info"} <= report.keys()
    text = CliRunner().invoke(cli, ["doctor"]).stdout
    assert text.splitlines()[2] == f"mlx: {report['mlx']}"
    if "cpu" in report["device"] and "blas" in report:
        assert ("blas: OpenBLAS" in text) == report["openblas"]


def test_doctor_reports_the_speed_settings_a_run_uses(monkeypatch):
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER", raising=False)
    report = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).stdout)
    # The graph cache size is mlxbatch's default unless set; unset settings are left out.
    assert report["settings"]["MLX_USE_CUDA_GRAPHS"] == "0"
    assert report["settings"]["MLX_CUDA_GRAPH_CACHE_SIZE"]
    assert "MLX_MAX_OPS_PER_BUFFER" not in report["settings"]
    lines = CliRunner().invoke(cli, ["doctor"]).stdout.splitlines()
    settings = next(line for line in lines if line.startswith("settings: "))
    assert "MLX_USE_CUDA_GRAPHS=0" in settings.split()


def test_quantize_in_memory_changes_results_and_key(tmp_path, tiny_model):
    f = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"{i} the cat sat on the mat"} for i in range(4)]
    )
    full, q4 = tmp_path / "full.jsonl", tmp_path / "q4.jsonl"
    run = CliRunner().invoke
    assert (
        run(
            cli, ["process", str(f), "-m", tiny_model, "--max-tokens", "6", "-o", str(full)]
        ).exit_code
        == 0
    )
    result = run(
        cli,
        [
            "process",
            str(f),
            "-m",
            tiny_model,
            "--max-tokens",
            "6",
            "-o",
            str(q4),
            "--quantize",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "0 cached" in result.stderr
    assert all(r["usage"]["completion_tokens"] == 6 for r in read_jsonl(q4))
    # 4-bit weights of a random model change at least some greedy continuations.
    assert [r["output"] for r in read_jsonl(q4)] != [r["output"] for r in read_jsonl(full)]
