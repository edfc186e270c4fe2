"""Row caches: a shared prefix is held once (or broadcast in one copy), unpadded prefill steps
get a causal mask, and generation with them gives the tokens mlx-lm's own caches give."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache

from mlxbatch.pipeline.engine.attention import batch_attention, shared_prefix_attention
from mlxbatch.pipeline.engine.cache import RowBatchKVCache
from mlxbatch.pipeline.engine.model import Engine
from mlxbatch.pipeline.engine.row_kv import RowKVCache, continuing, row_cache


@pytest.fixture(scope="module")
def model(tiny_model):
    return load(tiny_model)[0]


def _prefilled(model, ids: list[int], share_prefix: bool = False) -> list:
    cache = row_cache(model, share_prefix)
    model(mx.array(ids)[None], cache=cache)
    return cache


def _generate(model, prompts: list[list[int]], caches=None, prefill: int = 8) -> list[list[int]]:
    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=8, prefill_batch_size=prefill)
    uids = gen.insert(prompts, max_tokens=[6] * len(prompts), caches=caches)
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    finished = 0
    with batch_attention(model):
        while finished < len(uids):
            for r in gen.next_generated():
                tokens[r.uid].append(r.token)
                finished += r.finish_reason is not None
    gen.close()
    return [tokens[uid] for uid in uids]


def test_a_shared_prefix_merges_into_one_broadcast_copy(model):
    prefix = _prefilled(model, [5, 9, 14, 3, 22])
    assert all(type(c) is RowKVCache for c in prefix)
    merged = RowKVCache.merge([prefix[0]] * 3)
    assert type(merged) is RowBatchKVCache
    assert merged.keys.shape[0] == 3 and merged.size() == 5
    assert merged.left_padding.tolist() == [0, 0, 0] and merged.offset.tolist() == [5, 5, 5]
    for row in range(3):
        assert mx.array_equal(merged.keys[row], prefix[0].keys[0, :, :5]).item()
        assert mx.array_equal(merged.values[row], prefix[0].values[0, :, :5]).item()


def test_a_shared_prefix_is_held_once_when_its_attention_is_in_place(model):
    prefix = _prefilled(model, [5, 9, 14, 3, 22], share_prefix=True)
    merged = RowKVCache.merge([prefix[0]] * 3)
    assert merged.keys is None and merged.size() == 0  # no row holds a copy
    assert merged.offset.tolist() == [5, 5, 5]  # rotary positions still count the prefix
    assert merged.prefix is not None and merged.prefix[0].shape[:3] == (1, 2, 5)
    assert mx.array_equal(merged.prefix[0], prefix[0].keys[..., :5, :]).item()


def test_rows_continuing_a_prefix_share_padding_arrays_that_no_layer_changes_in_place(model):
    prefix = _prefilled(model, [5, 9, 14, 3, 22], share_prefix=True)
    layers = continuing(prefix, 3)
    merged = [c.merge([c] * 3) for c in prefix]
    assert len(layers) == len(prefix) > 1
    for ours, theirs in zip(layers, merged, strict=True):
        assert ours.offset.tolist() == theirs.offset.tolist() == [5, 5, 5]
        assert ours.left_padding.tolist() == theirs.left_padding.tolist() == [0, 0, 0]
        assert all(
            mx.array_equal(a, b).item() for a, b in zip(ours.prefix, theirs.prefix, strict=True)
        )
    assert layers[0].left_padding is layers[1].left_padding  # made once for all layers
    # mlx-lm's prepare adds left padding in place; here one layer's must not reach another's.
    layers[0].prepare(left_padding=[1, 0, 2])
    assert layers[0].left_padding.tolist() == [1, 0, 2]
    assert layers[0].offset.tolist() == [4, 5, 3]
    assert layers[1].left_padding.tolist() == [0, 0, 0]
    assert layers[1].offset.tolist() == [5, 5, 5]


def test_different_or_empty_caches_merge_as_mlx_lm_merges_them(model):
    short, long = _prefilled(model, [5, 9]), _prefilled(model, [7, 8, 11])
    merged = RowKVCache.merge([short[0], long[0]])
    theirs = BatchKVCache.merge([short[0], long[0]])
    assert type(merged) is RowBatchKVCache
    assert merged.left_padding.tolist() == theirs.left_padding.tolist() == [1, 0]
    assert mx.array_equal(merged.keys, theirs.keys).item()
    empty = RowKVCache.merge([RowKVCache(), RowKVCache()])
    assert type(empty) is RowBatchKVCache and empty.keys is None


def test_only_prefill_steps_without_left_padding_get_a_causal_mask():
    assert RowBatchKVCache([0, 0]).make_mask(4) == "causal"
    padded = RowBatchKVCache([0, 2]).make_mask(4)
    assert isinstance(padded, mx.array) and padded.shape == (2, 1, 4, 4)
    assert isinstance(RowBatchKVCache([0, 0]).make_mask(1), mx.array)
    assert isinstance(RowBatchKVCache([0, 0]).make_mask(4, return_array=True), mx.array)


def test_the_mask_follows_padding_changed_after_construction():
    # The padding given at construction is known without reading the device; each later
    # change (mlx-lm's prepare in place, a filtered or merged batch) must be seen.
    prepared = RowBatchKVCache([0, 0])
    prepared.prepare(lengths=[3, 1], right_padding=[0, 2])
    assert prepared.make_mask(3) == "causal"
    prepared.prepare(left_padding=[0, 1])
    assert isinstance(prepared.make_mask(3), mx.array)
    rebound = RowBatchKVCache([0, 0])
    rebound.left_padding = mx.array([1, 0])
    assert isinstance(rebound.make_mask(3), mx.array)


def test_finalize_rolls_right_padded_rows_as_mlx_lm_does():
    mx.random.seed(1)
    keys, values = mx.random.normal((3, 2, 9, 4)), mx.random.normal((3, 2, 9, 6))
    ours, theirs = RowBatchKVCache([0, 0, 0]), BatchKVCache([0, 0, 0])
    for cache in (ours, theirs):
        cache.prepare(lengths=[7, 5, 8], right_padding=[1, 3, 0])
        cache.update_and_fetch(keys, values)
        cache.finalize()
    assert ours.left_padding.tolist() == theirs.left_padding.tolist() == [1, 3, 0]
    assert ours.offset.tolist() == theirs.offset.tolist()
    assert ours._idx == theirs._idx == 9
    # Each row's tokens, after its padding (masked, so its contents are not part of the deal).
    for row, start in enumerate([1, 3, 0]):
        for name in ("keys", "values"):
            mine, mlx_lms = getattr(ours, name), getattr(theirs, name)
            assert mx.array_equal(mine[row, :, start:9], mlx_lms[row, :, start:9]).item()


def test_padding_stays_known_on_the_host_through_finalize_pick_and_stack():
    mx.random.seed(2)
    batches = []
    for right in ([1, 3, 0], [0, 2]):
        cache = RowBatchKVCache([0] * len(right))
        cache.prepare(lengths=[9 - r for r in right], right_padding=right)
        cache.update_and_fetch(
            mx.random.normal((len(right), 2, 9, 4)), mx.random.normal((len(right), 2, 9, 4))
        )
        cache.finalize()
        assert cache._known_padding() == cache.left_padding.tolist() == right
        batches.append(cache)
    batches[1].update_and_fetch(mx.random.normal((2, 2, 2, 4)), mx.random.normal((2, 2, 2, 4)))
    stacked = RowBatchKVCache.stack(batches)
    assert stacked._known_padding() == stacked.left_padding.tolist() == [3, 5, 2, 0, 2]
    picked = stacked.pick([4, 0, 1])
    assert picked._known_padding() == picked.left_padding.tolist() == [2, 3, 5]


def test_row_caches_generate_the_tokens_mlx_lm_caches_do(model, monkeypatch):
    masks = []
    make_mask = RowBatchKVCache.make_mask

    def spy(self, N, **kwargs):
        masks.append(make_mask(self, N, **kwargs))
        return masks[-1]

    monkeypatch.setattr(RowBatchKVCache, "make_mask", spy)
    prefix = [5, 9, 14, 3, 22, 40, 41]
    suffixes = [[7], [8, 11, 12], [30, 31, 32, 33, 34, 35], [50, 51]]
    full = [prefix + s for s in suffixes]
    theirs = _generate(model, full)
    assert _generate(model, full, caches=[row_cache(model) for _ in full]) == theirs
    shared = _prefilled(model, prefix)
    assert _generate(model, suffixes, caches=[shared] * len(suffixes)) == theirs
    # Prefixes of different lengths: left-padded prefill steps, which need their array masks.
    cut = [2, 7, 4, 0]
    caches = [_prefilled(model, prefix[:k]) if k else row_cache(model) for k in cut]
    assert (
        _generate(model, [f[k:] for f, k in zip(full, cut, strict=True)], caches=caches) == theirs
    )
    # Right-padded prefill steps took the causal mask; decode steps kept their array masks.
    assert any(isinstance(m, str) for m in masks)
    assert any(isinstance(m, mx.array) for m in masks)


def _attention_inputs(rows: int, n: int, own: int, prefix: int):
    mx.random.seed(5)
    q = mx.random.normal((rows, 4, n, 8))
    pk, pv = mx.random.normal((1, 2, prefix, 8)), mx.random.normal((1, 2, prefix, 8))
    k, v = mx.random.normal((rows, 2, own, 8)), mx.random.normal((rows, 2, own, 8))
    full_k = mx.concatenate([mx.broadcast_to(pk, (rows, 2, prefix, 8)), k], axis=2)
    full_v = mx.concatenate([mx.broadcast_to(pv, (rows, 2, prefix, 8)), v], axis=2)
    cache = RowBatchKVCache([0] * rows)
    cache.prefix = (pk, pv)
    return q, k, v, full_k, full_v, cache


@pytest.mark.parametrize("additive", [False, True])
def test_shared_prefix_attention_equals_attention_over_the_whole_history(additive):
    left_padding = mx.array([0, 2, 1])
    q, k, v, full_k, full_v, cache = _attention_inputs(3, 1, 5, 6)
    own_mask = (mx.arange(5)[None, :] >= left_padding[:, None])[:, None, None, :]
    full_mask = mx.concatenate([mx.ones((3, 1, 1, 6), mx.bool_), own_mask], axis=-1)
    if additive:
        own_mask, full_mask = (mx.where(m, 0.0, -1e9) for m in (own_mask, full_mask))
    ours = shared_prefix_attention(q, k, v, cache, 0.3, own_mask)
    theirs = mx.fast.scaled_dot_product_attention(q, full_k, full_v, scale=0.3, mask=full_mask)
    assert mx.allclose(ours, theirs, atol=1e-5).item()
    # Prefill chunks: causal over their own tokens after the whole prefix, the first chunk
    # (4 queries, 4 own keys) and a later one (3 queries after 4 own tokens already cached).
    for n, own in [(4, 4), (3, 7)]:
        q, k, v, full_k, full_v, cache = _attention_inputs(3, n, own, 6)
        ours = shared_prefix_attention(q, k, v, cache, 0.3, "causal")
        theirs = mx.fast.scaled_dot_product_attention(q, full_k, full_v, scale=0.3, mask="causal")
        assert mx.allclose(ours, theirs, atol=1e-5).item()
    # A left-padded prefill chunk: an array mask over its own keys.
    q, k, v, full_k, full_v, cache = _attention_inputs(3, 3, 5, 6)
    causal = mx.arange(2, 5)[:, None] >= mx.arange(5)[None, :]
    own_mask = (causal[None] & (mx.arange(5)[None, None, :] >= left_padding[:, None, None]))[
        :, None
    ]
    full_mask = mx.concatenate([mx.ones((3, 1, 3, 6), mx.bool_), own_mask], axis=-1)
    if additive:
        own_mask, full_mask = (mx.where(m, 0.0, -1e9) for m in (own_mask, full_mask))
    ours = shared_prefix_attention(q, k, v, cache, 0.3, own_mask)
    theirs = mx.fast.scaled_dot_product_attention(q, full_k, full_v, scale=0.3, mask=full_mask)
    assert mx.allclose(ours, theirs, atol=1e-5).item()


def test_shared_prefixes_generate_the_tokens_mlx_lm_caches_do(model):
    first, second = [5, 9, 14, 3, 22, 40, 41], [60, 61, 62, 63]
    suffixes = [[7], [8, 11, 12], [30, 31, 32, 33, 34, 35], [50, 51]]
    prefixes = [first, first, second, second]
    theirs = _generate(model, [p + s for p, s in zip(prefixes, suffixes, strict=True)])
    one = _prefilled(model, first, share_prefix=True)
    same = [p + s for p, s in zip([first] * 4, suffixes, strict=True)]
    assert _generate(model, suffixes, caches=[one] * 4) == _generate(model, same)
    # Two prefixes, prefilled two rows at a time: the batches meet, and the prefix is copied
    # into every row first.
    two = _prefilled(model, second, share_prefix=True)
    assert _generate(model, suffixes, caches=[one, one, two, two], prefill=2) == theirs


def test_prefixes_are_shared_only_where_every_layer_adds_them(tiny_model, monkeypatch):
    engine = Engine(tiny_model)
    assert engine.shares_prefixes
    assert all(c.share_prefix for c in engine.prefill_prefixes([[5, 9, 14]])[0])
    import mlx_lm.models.llama as llama

    # A model module whose attention is not mlx-lm's shared function keeps whole copies.
    from mlx_lm.models import base

    def own(*args, **kwargs):
        return base.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(llama, "scaled_dot_product_attention", own)
    engine = Engine(tiny_model)
    assert not engine.shares_prefixes
    assert not any(c.share_prefix for c in engine.prefill_prefixes([[5, 9, 14]])[0])


def test_extract_cuts_out_rows_as_mlx_lm_does():
    mx.random.seed(2)
    keys, values = mx.random.normal((3, 2, 6, 4)), mx.random.normal((3, 2, 6, 4))
    ours, theirs = RowBatchKVCache([1, 0, 3]), BatchKVCache([1, 0, 3])
    for cache in (ours, theirs):
        cache.update_and_fetch(keys, values)

    def same_rows(rows: int) -> bool:
        pairs = [(ours.extract(i), theirs.extract(i)) for i in range(rows)]
        return all(
            mx.array_equal(a.keys, b.keys).item()
            and mx.array_equal(a.values, b.values).item()
            and a.offset == b.offset
            for a, b in pairs
        )

    assert same_rows(3)
    # A row cut out is sliced only when first read: it must still be the row as it was.
    early, expected = ours.extract(2), theirs.extract(2)
    for cache in (ours, theirs):
        cache.filter([0, 2])  # drops a row, then the padding all rows still share
    assert ours.left_padding.tolist() == [0, 2]
    assert same_rows(2)
    early_keys, early_values, early_offset = early.state
    assert early_offset == expected.offset == 3
    assert mx.array_equal(early_keys, expected.keys).item()
    assert mx.array_equal(early_values, expected.values).item()
    prefix = (mx.random.normal((1, 2, 4, 4)), mx.random.normal((1, 2, 4, 4)))
    ours.prefix = prefix
    row = ours.extract(1)
    assert row.offset == 4 + 3  # the prefix, then the row's own 3 tokens
    assert mx.array_equal(row.keys[:, :, :4], prefix[0]).item()


def test_filter_keeps_a_batch_whose_rows_all_stay_as_it_is_and_otherwise_filters_as_mlx_lm():
    mx.random.seed(3)
    keys, values = mx.random.normal((3, 2, 5, 4)), mx.random.normal((3, 2, 5, 4))
    cases = ([0, 2, 1], [0, 1, 2]), ([1, 2, 3], [0, 1, 2]), ([0, 2, 1], [1, 2]), ([3, 1, 2], [2, 0])
    for padding, keep in cases:
        ours, theirs = RowBatchKVCache(padding), BatchKVCache(padding)
        for cache in (ours, theirs):
            cache.update_and_fetch(keys, values)
        before = ours.keys
        ours.filter(keep)
        theirs.filter(keep)
        if padding == [0, 2, 1] and keep == [0, 1, 2]:
            assert ours.keys is before  # nothing to copy
        assert ours.left_padding.tolist() == theirs.left_padding.tolist()
        # The filtered padding is known on the host, for the next filter and masks.
        assert ours._padding is not None and ours._padding[0] is ours.left_padding
        assert ours._padding[1] == theirs.left_padding.tolist()
        assert ours.offset.tolist() == theirs.offset.tolist() and ours._idx == theirs._idx
        assert mx.array_equal(ours.keys[..., : ours._idx, :], theirs.keys[..., : theirs._idx, :])
