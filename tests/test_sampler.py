"""The shared seeded sampler reads its rows from the mlx-lm batch that calls it, or refuses."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxbatch.pipeline.engine import UnsupportedMlxLm, sampling
from tests.conftest import write_jsonl
from tests.test_cli_process import process


def test_sampler_called_from_anything_but_a_batch_step_refuses():
    with pytest.raises(UnsupportedMlxLm, match="calls samplers differently"):
        sampling.SeededSampler()(mx.zeros((2, 5)))


def test_a_changed_sampler_call_fails_the_run_cleanly(tmp_path, tiny_model, monkeypatch):
    """Not retried as a failing step and not turned into error records: exit 1, one line."""

    def changed(rows: int) -> list[int]:
        raise UnsupportedMlxLm("this mlx-lm version calls samplers differently; pin mlx-lm<0.33")

    monkeypatch.setattr(sampling, "calling_batch_uids", changed)
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hi", "temperature": 0.7}])
    result = process(str(f), "-m", tiny_model, "--max-tokens", "3")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: this mlx-lm version calls samplers differently; pin mlx-lm<0.33\n"
    )
