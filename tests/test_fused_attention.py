"""The fused decode attention kernel: where it applies, and (on CUDA) that it computes MLX's result.

The kernel itself runs only on CUDA; its tests are skipped elsewhere, and `fusable`'s choices,
which decide what reaches it, are tested everywhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import pytest

from mlxbatch.pipeline.engine import attention, fused_attention
from mlxbatch.pipeline.engine.attention import shared_prefix_attention
from mlxbatch.pipeline.engine.fused_attention import fusable, fused_decode_attention, key_splits
from mlxbatch.testing.tiny_model import build_tiny_model
from tests.conftest import read_jsonl, write_jsonl
from tests.test_cli_process import process

on_cuda = pytest.mark.skipif(
    not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="the kernel runs on CUDA only"
)


def _step(rows=5, heads=4, kv_heads=2, dim=64, idx=9, capacity=16, prefix=0, dtype=mx.float32):
    """One decode step's inputs: a cache whose buffer holds `capacity` positions, `idx` of them
    written, rows left-padded by 0, 1, 2, ... positions, and a shared prefix of `prefix` keys."""
    mx.random.seed(7)
    keys = mx.random.normal((rows, kv_heads, capacity, dim)).astype(dtype)
    values = mx.random.normal((rows, kv_heads, capacity, dim)).astype(dtype)
    q = mx.random.normal((rows, heads, 1, dim)).astype(dtype)
    padding = mx.array([i % (idx - 1) for i in range(rows)])
    mask = (mx.arange(idx)[None, :] >= padding[:, None])[:, None, None, :]
    shared = None
    if prefix:
        shape = (1, kv_heads, prefix, dim)
        shared = (mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype))
    cache = SimpleNamespace(keys=keys, values=values, _idx=idx, prefix=shared)
    return q, keys[..., :idx, :], values[..., :idx, :], cache, mask


def _with_prefix(q, k, v, cache, mask):
    """MLX's own attention over the prefix put in front of every row's keys."""
    rows, length = q.shape[0], cache.prefix[0].shape[2]
    pk, pv = (mx.broadcast_to(p, (rows, *p.shape[1:])) for p in cache.prefix)
    seen = mx.ones((rows, 1, 1, length), mx.bool_)
    full_mask = mx.concatenate([seen, mask], axis=-1)
    keys, values = mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.125, mask=full_mask)


def _assert_kernel_matches_mlx(q, k, v, cache, mask):
    ours = fused_decode_attention(q, cache, 0.125, mask, cache.prefix)
    if cache.prefix is not None:
        theirs = _with_prefix(q, k, v, cache, mask)
    else:
        theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
    assert ours.shape == theirs.shape == q.shape
    assert mx.allclose(ours, theirs, atol=1e-4, rtol=1e-4).item()


def test_fusable_takes_plain_decode_steps_up_to_max_row_keys(monkeypatch):
    q, k, v, cache, mask = _step(rows=64)
    assert fusable(q, k, cache, mask)
    assert not fusable(q, k, cache, mask, sinks=mx.zeros((4,)))
    assert not fusable(q, k, cache, mx.where(mask, 0.0, -1e9))  # additive masks
    assert not fusable(q, k, cache, mask[..., 1:])  # a mask over other keys
    assert not fusable(q, k, cache, None)
    assert not fusable(mx.concatenate([q, q], axis=2), k, cache, mask)  # a prefill chunk
    assert not fusable(q, k, SimpleNamespace(**vars(cache), bits=4), mask)  # quantized cache
    assert not fusable(q, k, SimpleNamespace(**vars(cache), max_size=16), mask)  # sliding window
    q96, k96, _, cache96, mask96 = _step(rows=64, dim=96)
    assert not fusable(q96, k96, cache96, mask96)
    q16, k16, _, cache16, mask16 = _step(rows=64, dtype=mx.float16)
    assert fusable(q16, k16, cache16, mask16)
    assert not fusable(q16, k16, SimpleNamespace(**vars(cache)), mask16)  # dtypes differ
    assert fusable(*_step(rows=1)[:2], *_step(rows=1)[3:])  # small batches too
    # Keys the step's blocks walk, every row's and the shared prefix's: at most MAX_ROW_KEYS.
    monkeypatch.setattr(fused_attention, "MAX_ROW_KEYS", 3 * 100)
    at, over = _step(rows=3, prefix=100 - 9), _step(rows=3, prefix=100 - 8)
    assert fusable(*at[:2], *at[3:]) and not fusable(*over[:2], *over[3:])
    q, k, _, cache, mask = _step(rows=3, idx=101, capacity=108)
    assert not fusable(q, k, cache, mask)
    q, k, _, cache, mask = _step(rows=2, idx=101, capacity=108)  # fewer rows, longer ones
    assert fusable(q, k, cache, mask)


@on_cuda
@pytest.mark.parametrize("heads,kv_heads", [(14, 2), (4, 4), (8, 2)])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("prefix", [0, 300])
def test_kernel_matches_mlx(heads, kv_heads, dim, prefix):
    q, k, v, cache, mask = _step(7, heads, kv_heads, dim, idx=140, capacity=256, prefix=prefix)
    _assert_kernel_matches_mlx(q, k, v, cache, mask)


def test_keys_split_only_where_rows_are_few_and_long():
    assert key_splits(1024, 16000) == 1  # 512 rows, 2 KV heads: the device is full already
    assert key_splits(32, 16000) == 32  # 16 rows: 32 blocks become 1,024
    assert key_splits(128, 16000) == 8
    assert key_splits(32, 1550) == 4  # each share keeps MIN_SHARE keys or more
    assert key_splits(32, 511) == 1
    assert key_splits(1, 10**6) == fused_attention.MAX_SPLITS


@on_cuda
@pytest.mark.parametrize("splits", [2, 8, 32])
@pytest.mark.parametrize("prefix", [0, 300])
def test_split_keys_match_mlx(monkeypatch, splits, prefix):
    # Shares of 32 keys: at 32 splits most are empty, and row 0's first ones are all padding.
    monkeypatch.setattr(fused_attention, "MIN_SHARE", 1)
    monkeypatch.setattr(fused_attention, "MAX_SPLITS", splits)
    q, k, v, cache, mask = _step(7, 14, 2, 64, idx=140, capacity=256, prefix=prefix)
    mask = mx.concatenate([mask[:1] & (mx.arange(140) >= 100), mask[1:]])
    assert key_splits(7 * 2, 140 + prefix) == splits
    _assert_kernel_matches_mlx(q, k, v, cache, mask)


@on_cuda
def test_kernel_in_bfloat16_stays_within_rounding():
    q, k, v, cache, mask = _step(
        9, 14, 2, 64, idx=200, capacity=256, prefix=1500, dtype=mx.bfloat16
    )
    assert key_splits(9 * 2, 1700) == 4  # the split path, as a small batch behind a prefix takes
    ours = fused_decode_attention(q, cache, 0.125, mask, cache.prefix).astype(mx.float32)
    theirs = shared_prefix_attention(q, k, v, cache, 0.125, mask).astype(mx.float32)
    assert mx.abs(ours - theirs).max().item() < 2e-2


@on_cuda
@pytest.mark.parametrize("min_share", [10**6, 16])
def test_run_with_the_kernel_gives_the_same_text(tmp_path, monkeypatch, min_share):
    # Head size 64 (the tiny test model's is 16), and a system prompt shared by every row; steps
    # split their keys into shares of 16 keys or more, or never.
    monkeypatch.setattr(fused_attention, "MIN_SHARE", min_share)
    model = str(build_tiny_model(tmp_path / "m", hidden_size=256, num_attention_heads=4))
    calls, splits = [], []

    def counted(queries, cache, scale, mask, prefix=None):
        calls.append(prefix is not None)
        keys = cache._idx + (prefix[0].shape[2] if prefix is not None else 0)
        splits.append(key_splits(queries.shape[0] * cache.keys.shape[1], keys))
        return fused_decode_attention(queries, cache, scale, mask, prefix)

    monkeypatch.setattr(attention, "fused_decode_attention", counted)
    rows = [{"id": i, "text": " ".join(["word"] * (3 + i % 7)) + f" {i}"} for i in range(24)]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    system = "You label short texts. " * 40
    texts = {}
    for choice in ("mlx", "grouped", "fused"):
        out = tmp_path / f"{choice}.jsonl"
        env = {"MLXBATCH_DECODE_ATTENTION": choice}
        args = ("--template", "Text: {{ text }}", "--system", system, "--max-tokens", "8")
        result = process(str(f), "-m", model, *args, "-o", str(out), env=env)
        assert result.exit_code == 0, result.output
        texts[choice] = [r["output"] for r in read_jsonl(out)]
        # Decode steps took the kernel only when chosen, over the shared prefix.
        assert bool(calls) == (choice == "fused")
        assert all(calls)
    assert texts["fused"] == texts["grouped"] == texts["mlx"]
    assert (max(splits) > 1) == (min_share == 16)
