"""Model loading: the weights load on a worker thread; what goes wrong there is a load error."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import mlx.core as mx
import pytest
from mlx_lm import load

from mlxbatch.pipeline.engine import Engine, ModelLoadError
from mlxbatch.pipeline.engine.load import WeightsLoader
from tests.conftest import write_jsonl
from tests.test_cli_process import process


def test_the_engine_returns_while_its_weights_load_and_then_runs_the_same_model(
    tiny_model, monkeypatch
):
    release = threading.Event()
    read = WeightsLoader._read_weights

    def held(self):
        release.wait(timeout=30)  # the caller gets the engine before any weight is read
        read(self)

    monkeypatch.setattr(WeightsLoader, "_read_weights", held)
    engine = Engine(tiny_model)
    assert engine.tokenizer.encode("hi") and engine.dtype == "float32" and engine.identity
    assert engine._weights._thread.is_alive()
    release.set()
    ids = mx.array([[5, 9, 14, 3]])
    reference = load(tiny_model)[0]
    assert mx.allclose(engine.model(ids), reference(ids), atol=1e-5).item()


def test_a_failure_reading_the_weights_is_a_load_error_at_first_use(
    tmp_path, tiny_model, monkeypatch
):
    def broken(self):
        raise RuntimeError("read failed: disk gone")

    monkeypatch.setattr(WeightsLoader, "_read_weights", broken)
    engine = Engine(tiny_model)
    with pytest.raises(ModelLoadError, match="disk gone"):
        engine.model  # noqa: B018
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    result = process(str(f), "-m", tiny_model, "--max-tokens", "2", "-o", str(out))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: could not load model {tiny_model!r} (RuntimeError: read failed: disk gone)"
    )
    assert not out.exists()


def test_a_process_that_ends_while_weights_load_waits_for_them(tmp_path, tiny_model):
    # Ending while the worker was still reading (a run with every row already done) aborted
    # the process now and then (exit 134, 2 of 10 here): run it a few times.
    marker = tmp_path / "read"
    script = f"""
import time
from mlxbatch.pipeline.engine.load import WeightsLoader
read = WeightsLoader._read_weights
def slow(self):
    time.sleep(0.5)
    read(self)
    open({str(marker)!r}, "w").close()
WeightsLoader._read_weights = slow
from mlxbatch.pipeline.engine import Engine
Engine({tiny_model!r})
raise SystemExit(3)
"""
    for _ in range(4):
        marker.unlink(missing_ok=True)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
        assert done.returncode == 3, done.stderr.decode()
        assert marker.exists()


def test_the_engine_raises_mlx_cuda_graph_cache_unless_it_is_set():
    code = "import os, mlxbatch.pipeline.engine; print(os.environ['MLX_CUDA_GRAPH_CACHE_SIZE'])"
    env = {k: v for k, v in os.environ.items() if k != "MLX_CUDA_GRAPH_CACHE_SIZE"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert default.stdout.strip() == "1000", default.stderr
    env["MLX_CUDA_GRAPH_CACHE_SIZE"] = "64"
    own = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert own.stdout.strip() == "64", own.stderr


def test_the_tokenizer_loads_while_the_model_builds(tiny_model, monkeypatch):
    import mlx_lm.utils

    tokenizer_loaded = threading.Event()
    real_tokenizer, build = mlx_lm.utils.load_tokenizer, WeightsLoader._build
    built_after_tokenizer = []

    def tokenizer(*args, **kwargs):
        loaded = real_tokenizer(*args, **kwargs)
        tokenizer_loaded.set()
        return loaded

    def held(self, mx):
        built_after_tokenizer.append(tokenizer_loaded.wait(timeout=10))
        build(self, mx)

    monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", tokenizer)
    monkeypatch.setattr(WeightsLoader, "_build", held)
    engine = Engine(tiny_model)
    assert built_after_tokenizer == [True] and engine.dtype == "float32"


def test_a_failed_build_is_the_error_reported_even_when_the_tokenizer_fails(tmp_path, tiny_model):
    import json
    import shutil

    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no_such_arch"):
        Engine(str(broken))
