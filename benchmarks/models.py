"""Benchmark model shapes and their on-disk cache under `.bench/models/<name>`.

What it does: names the random-weight model shapes the benchmark uses (`tiny` for CPU,
`qwen05b` for GPU: Qwen2.5-0.5B's layer shapes with a small vocabulary), builds one with
`mlxbatch.testing.tiny_model.build_tiny_model` the first time it is asked for, and reuses the
directory afterwards (a `.complete` marker guards against half-built directories). The
tokenizer is trained on the workloads' own kind of text too (workloads.tokenizer_corpus), so
a workload word is about one token, as in the tokenizers of real models; before commit
708dd06 it was not, and every word was 3.4 tokens.

What it does not do: download checkpoints, quantize, or load the model into memory; the
contenders load it themselves, each the way its library does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BENCH_DIR = Path(".bench")

SHAPES: dict[str, dict] = {
    # Small enough for a 2-core CPU; float32 because bfloat16 matmul is slow on CPU.
    "tiny": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=688, vocab_size=4096, max_position_embeddings=4096, dtype="float32",
    ),
    # Qwen2.5-0.5B's transformer shapes and context (without its 151k vocabulary), for GPUs.
    "qwen05b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=8192, max_position_embeddings=32768, dtype="bfloat16",
    ),
}  # fmt: skip


def model_dir(shape: str, root: Path = BENCH_DIR) -> Path:
    """The cached model directory for `shape`, built (deterministically, seed 0) if missing."""
    from benchmarks.workloads import tokenizer_corpus
    from mlxbatch.testing.tiny_model import build_tiny_model

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose from {sorted(SHAPES)}")
    path = root / "models" / shape
    marker = path / ".complete"
    wanted = json.dumps({**SHAPES[shape], "corpus": "workloads"}, sort_keys=True)
    if marker.is_file() and marker.read_text(encoding="utf-8") == wanted:
        return path
    if path.exists():
        shutil.rmtree(path)
    print(f"building model {shape!r} in {path} ...", flush=True)
    build_tiny_model(path, seed=0, corpus=tokenizer_corpus(), **SHAPES[shape])
    marker.write_text(wanted, encoding="utf-8")
    return path


def bench_model(model: str | None, shape: str | None, gpu: bool) -> str:
    """The model a benchmark tool runs: `model` (a directory) if given, else the benchmark
    model of `shape`, by default qwen05b on a GPU and tiny on a CPU."""
    return model or str(model_dir(shape or ("qwen05b" if gpu else "tiny")))


def describe(path: Path) -> dict:
    """A few config facts for the report (layers, hidden size, vocab, dtype)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size", "torch_dtype")  # fmt: skip
    return {k: config.get(k) for k in keys}
