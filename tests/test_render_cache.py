"""Rows already done are not rendered again, and anything that changes their keys is noticed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlxbatch.pipeline import render
from tests.conftest import read_jsonl, write_jsonl
from tests.test_cli_process import generated_count, process, prompts


@pytest.fixture
def renders(monkeypatch) -> list[int]:
    """How many prompts each run renders (one count per `process` call)."""
    counts = [0]
    real = render.prompt_text

    def counted(*args, **kwargs):
        counts[-1] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(render, "prompt_text", counted)
    return counts


def run(renders: list[int], *args: str):
    renders.append(0)
    result = process(*args)
    assert result.exit_code == 0, result.output
    return result


def test_done_rows_are_not_rendered_again(tmp_path, tiny_model, renders):
    sampled = {"id": "s", "prompt": "tell me", "n": 3, "temperature": 0.9, "seed": 4}
    f = write_jsonl(tmp_path / "p.jsonl", [*prompts(6), sampled])
    out = tmp_path / "out.jsonl"
    args = ("-m", tiny_model, "--max-tokens", "3", "-o", str(out))
    run(renders, str(f), *args)
    first = out.read_bytes()
    again = run(renders, str(f), *args)
    assert generated_count(again.stderr) == (9, 9)
    assert out.read_bytes() == first
    write_jsonl(f, [*prompts(6), sampled, *prompts(2, start=6)])
    grown = run(renders, str(f), *args)
    assert generated_count(grown.stderr) == (11, 9)
    assert renders[1:] == [7, 0, 2]
    assert out.read_bytes().startswith(first)


def test_changed_template_is_rendered_and_generated_again(tmp_path, tiny_model, renders):
    f = write_jsonl(tmp_path / "p.jsonl", [{"text": w} for w in ("alpha", "beta", "gamma")])
    base = (str(f), "-m", tiny_model, "--max-tokens", "2")
    run(renders, *base, "--template", "Say {{ text }}")
    changed = run(renders, *base, "--template", "Shout {{ text }}")
    assert generated_count(changed.stderr) == (3, 0)
    assert renders[1:] == [3, 3]


def test_changed_chat_template_is_noticed(tmp_path, tiny_model, renders):
    """The model's weights and config stay the same; only its tokenizer's chat template changes."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    f = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    base = (str(f), "-m", str(model), "--max-tokens", "2")
    run(renders, *base)
    config_path = Path(model) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "Q: " + config["chat_template"]
    config_path.write_text(json.dumps(config))
    changed = run(renders, *base)
    assert generated_count(changed.stderr) == (1, 0)
    assert renders[1:] == [1, 1]
    assert read_jsonl(tmp_path / "p.out.jsonl")[0]["usage"]["prompt_tokens"] > 0


def test_changed_tokenizer_is_noticed(tmp_path, tiny_model, renders):
    """Weights, config and chat template stay the same; the tokenizer's files change."""
    model = shutil.copytree(tiny_model, tmp_path / "model")
    f = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    base = (str(f), "-m", str(model), "--max-tokens", "2")
    run(renders, *base)
    run(renders, *base)
    tokenizer_path = Path(model) / "tokenizer.json"
    tokenizer = json.loads(tokenizer_path.read_text())
    tokenizer["normalizer"] = {"type": "Lowercase"}
    tokenizer_path.write_text(json.dumps(tokenizer))
    run(renders, *base)
    assert renders[1:] == [1, 0, 1]
