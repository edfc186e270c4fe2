"""Provenance: `<output>.manifest.json`, the run row, `status`, and macOS power assertions."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.jobs import power, provenance
from tests.conftest import write_jsonl


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_adapter(path: Path) -> Path:
    """A one-tensor LoRA adapter for the tiny model, in mlx-lm's adapter layout."""
    import mlx.core as mx

    path.mkdir()
    config = {"fine_tune_type": "lora", "num_layers": 1,
              "lora_parameters": {"rank": 2, "scale": 1.0, "dropout": 0.0}}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    weights = {"model.layers.1.self_attn.q_proj.lora_a": mx.ones((64, 2)) * 0.01}
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    return path


def test_run_manifest_records_model_settings_input_and_counts(tmp_path, tiny_model):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prompt": f"hello {i}"} for i in range(5)])
    adapter = make_adapter(tmp_path / "adapter")
    out = tmp_path / "out.jsonl"
    result = invoke("process", str(inp), "-m", tiny_model, "--adapter-path", str(adapter),
                    "--max-tokens", "3", "--seed", "11", "--temperature", "0.5", "-o", str(out),
                    "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    model = manifest["model"]
    assert model["name"] == tiny_model and model["path"] == os.path.abspath(tiny_model)
    assert model["revision"] is None  # a local directory, not a Hub snapshot
    assert model["config_sha256"] == sha256(Path(tiny_model) / "config.json")
    template = json.loads((Path(tiny_model) / "tokenizer_config.json").read_text())["chat_template"]
    assert model["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert model["dtype"] == "float32" and model["quantization"] is None
    inner = hashlib.sha256()
    for name in ("adapter_config.json", "adapters.safetensors"):
        inner.update(f"{name}\0{sha256(adapter / name)}\n".encode())
    assert model["adapter"] == {"path": str(adapter), "sha256": inner.hexdigest()}
    assert manifest["input"] == {"path": str(inp), "sha256": sha256(inp), "kind": "prompt"}
    assert manifest["generation"]["temperature"] == 0.5 and manifest["seed"]["default"] == 11
    assert manifest["versions"]["mlx"] == version("mlx")
    assert manifest["versions"]["mlx-lm"] == version("mlx-lm")
    assert manifest["status"] == "completed" and manifest["kind"] == "run"
    assert (manifest["rows"]["rows"], manifest["rows"]["done"], manifest["rows"]["failed"]) == (
        5, 5, 0,
    )  # fmt: skip
    assert manifest["started_unix"] <= manifest["finished_unix"]

    import sqlite3

    with sqlite3.connect(f"{out}.mlxbatch.sqlite") as db:
        identity, stored = db.execute("SELECT model_identity, provenance FROM runs").fetchone()
    assert model["identity"] == identity and json.loads(stored) == manifest

    status = invoke("status", str(out))
    assert f"provenance: {out}.manifest.json" in status.stdout
    assert f"  adapter: {adapter} (sha256 {inner.hexdigest()})" in status.stdout
    assert f"  input: {inp} (sha256 {sha256(inp)})" in status.stdout
    assert f"  seed: 11; mlxbatch 0.1.0, mlx {version('mlx')}, mlx-lm {version('mlx-lm')}" in (
        status.stdout
    )
    data = json.loads(invoke("status", str(out), "--json").stdout)
    assert data["provenance"] == manifest


def test_quantized_run_records_its_quantization(tmp_path, tiny_model):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    out = tmp_path / "q.jsonl"
    result = invoke("process", str(inp), "-m", tiny_model, "--quantize", "4", "--max-tokens", "2",
                    "-o", str(out), "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    model = json.loads(Path(f"{out}.manifest.json").read_text())["model"]
    assert model["quantized_at_load"] == 4
    assert model["quantization"]["bits"] == 4 and model["quantization"]["group_size"] == 64
    assert "quantization 4-bit, group 64" in invoke("status", str(out)).stdout


def test_hub_snapshot_revision_is_read_from_the_cache(tmp_path):
    repo = tmp_path / "models--org--tiny-model"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    path = provenance.resolve_model_path("org/tiny-model", cache_dir=str(tmp_path))
    assert path == str(snapshot)
    assert provenance.hub_revision(path) == "0123abcd"
    assert provenance.resolve_model_path("org/not-cached", cache_dir=str(tmp_path)) is None
    assert provenance.hub_revision("/models/snapshots/x") is None


def test_chat_template_hash_of_strings_and_functions():
    class Tok:
        chat_template = "{{ messages }}"

    assert provenance.chat_template_sha256(Tok()) == hashlib.sha256(b"{{ messages }}").hexdigest()
    Tok.chat_template = None  # type: ignore[assignment]
    assert provenance.chat_template_sha256(Tok()) is None


def test_a_stale_manifest_temp_file_is_cleaned_and_no_temp_is_left(tmp_path):
    target = tmp_path / "out.jsonl.manifest.json"
    stale = tmp_path / ".out.jsonl.manifest.json.tmp-999999999"
    stale.write_text("half")
    provenance.write_manifest(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.manifest.json"]


# -- macOS: a power assertion for the run ---------------------------------------------------


class FakePopen:
    started: list[list[str]] = []
    terminated = 0

    def __init__(self, command, **kwargs):
        assert kwargs["stdin"] is subprocess.DEVNULL
        FakePopen.started.append(list(command))

    def terminate(self):
        FakePopen.terminated += 1

    def wait(self, timeout=None):
        return 0


@pytest.fixture
def mac(monkeypatch):
    FakePopen.started, FakePopen.terminated = [], 0
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(power.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(power.subprocess, "Popen", FakePopen)
    return monkeypatch


def test_caffeinate_command_holds_idle_sleep_for_this_process(mac):
    command = power.caffeinate_command(4242)
    assert command == ["/usr/bin/caffeinate", "-i", "-w", "4242"]
    assert "-d" not in command  # the display may sleep
    with power.keep_awake() as process:
        assert process is not None
        assert FakePopen.started == [["/usr/bin/caffeinate", "-i", "-w", str(os.getpid())]]
        assert FakePopen.terminated == 0
    assert FakePopen.terminated == 1


def test_no_caffeinate_is_silently_skipped(mac):
    mac.setattr(power.shutil, "which", lambda name: None)
    with power.keep_awake() as process:
        assert process is None

    def broken(*args, **kwargs):
        raise OSError("cannot run")

    mac.setattr(power.shutil, "which", lambda name: "/usr/bin/caffeinate")
    mac.setattr(power.subprocess, "Popen", broken)
    with power.keep_awake() as process:
        assert process is None


def test_linux_holds_nothing(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert power.caffeinate_command(1) is None


def test_a_run_on_macos_holds_the_assertion_while_it_runs(mac, tmp_path, tiny_model):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}])
    assert invoke("process", str(inp), "-m", tiny_model, "--max-tokens", "2", "-q").exit_code == 0
    assert FakePopen.started == [["/usr/bin/caffeinate", "-i", "-w", str(os.getpid())]]
    assert FakePopen.terminated == 1
    FakePopen.started = []
    dry = invoke("process", str(inp), "-m", tiny_model, "--max-tokens", "2", "--dry-run")
    assert dry.exit_code == 0 and FakePopen.started == []
