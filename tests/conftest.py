"""Shared fixtures: a tiny random-weight model on disk, loaded through mlx_lm's real path."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The tests run float32 models and compare computations to 1e-4 or token for token, which MLX's
# reduced-precision float32 matmuls (its default on CUDA and Apple M5 GPUs) do not hold.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import pytest  # noqa: E402

from mlxbatch.testing.tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny Llama model directory (config, safetensors, BPE tokenizer, chat template)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def short_context_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Like tiny_model, with a 64-token context, for context-length errors."""
    path = tmp_path_factory.mktemp("models") / "short"
    return str(build_tiny_model(path, max_position_embeddings=64))


WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "an",
    "old",
    "robot",
    "counts",
    "green",
    "apples",
    "near",
    "the",
    "station",
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
