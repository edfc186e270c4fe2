"""The grouped decode attention equals MLX's own, and a run with it gives the same text."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxbatch.pipeline.engine import attention
from mlxbatch.pipeline.engine.attention import grouped_decode_attention
from tests.conftest import read_jsonl, write_jsonl
from tests.test_cli_process import process, prompts


def _inputs(batch: int, heads: int, kv_heads: int, length: int, n: int = 1):
    mx.random.seed(3)
    q = mx.random.normal((batch, heads, n, 16))
    k = mx.random.normal((batch, kv_heads, length, 16))
    v = mx.random.normal((batch, kv_heads, length, 16))
    left_padding = mx.array([i % 5 for i in range(batch)])
    mask = (mx.arange(length)[None, :] >= left_padding[:, None])[:, None, None, :]
    return q, k, v, mask


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1), (2, 2)])
@pytest.mark.parametrize("additive", [False, True])
def test_grouped_decode_attention_matches_mlx(heads, kv_heads, additive):
    q, k, v, mask = _inputs(6, heads, kv_heads, 11)
    if additive:
        mask = mx.where(mask, 0.0, -1e9)
    ours = grouped_decode_attention(q, k, v, cache=None, scale=0.25, mask=mask)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    assert ours.shape == theirs.shape
    assert mx.allclose(ours, theirs, atol=1e-5).item()


def test_prefill_chunks_and_other_masks_go_to_mlx_lm_attention():
    q, k, v, mask = _inputs(3, 4, 2, 9, n=5)
    causal = mx.arange(9)[None, :] <= mx.arange(4, 9)[:, None]
    padded = mask & causal[None, None]  # a prefill chunk of a left-padded batch, [3, 1, 5, 9]
    for mask in (padded, None, "causal"):
        ours = grouped_decode_attention(q, k, v, cache=None, scale=0.25, mask=mask)
        theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        assert mx.array_equal(ours, theirs).item()


def test_run_with_grouped_decode_attention_gives_the_same_text(tmp_path, tiny_model, monkeypatch):
    decode_steps = []

    def counted(queries, keys, values, cache, scale, mask, sinks=None):
        if queries.shape[2] == 1 and isinstance(mask, mx.array):
            decode_steps.append(queries.shape[0])
        return grouped_decode_attention(queries, keys, values, cache, scale, mask, sinks)

    monkeypatch.setattr(attention, "grouped_decode_attention", counted)
    f = write_jsonl(tmp_path / "p.jsonl", prompts(12))
    texts = {}
    for choice in ("mlx", "grouped"):
        out = tmp_path / f"{choice}.jsonl"
        env = {"MLXBATCH_DECODE_ATTENTION": choice}
        result = process(str(f), "-m", tiny_model, "--max-tokens", "8", "-o", str(out), env=env)
        assert result.exit_code == 0, result.output
        texts[choice] = [r["output"] for r in read_jsonl(out)]
        # Padded decode steps of the 12-row batch took the grouped path only when chosen.
        assert (max(decode_steps, default=0) == 12) == (choice == "grouped")
    assert texts["grouped"] == texts["mlx"]


def test_batch_attention_swaps_each_entry_and_walks_a_models_modules_once(tiny_model, monkeypatch):
    from mlx_lm import load
    from mlx_lm.models import base, llama

    model = load(tiny_model)[0]
    walks = []
    real_modules = type(model).modules

    def counted(self):
        walks.append(self)
        return real_modules(self)

    monkeypatch.setattr(type(model), "modules", counted)
    for _ in range(3):
        with attention.batch_attention(model):
            assert llama.scaled_dot_product_attention is not base.scaled_dot_product_attention
            with attention.batch_attention(model):  # nested: nothing more to swap or put back
                pass
            assert llama.scaled_dot_product_attention is not base.scaled_dot_product_attention
        assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert len(walks) == 1
