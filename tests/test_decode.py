"""Decode steps without mlx-lm's per-row split of the log-probabilities: same tokens, same
log-probabilities, one array per step behind every row's handle."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch

from mlxbatch.pipeline.engine.decode import (
    HandOverBatch,
    LaterRow,
    RowLogprobs,
    RowLogprobsBatch,
    batch_classes,
)
from mlxbatch.pipeline.engine.row_kv import row_cache


@pytest.fixture(scope="module")
def model(tiny_model):
    return load(tiny_model)[0]


def _steps(model, prompts):
    """Every response of a BatchGenerator run, (uid, token, logprobs row as a list), and per
    step its (rows, distinct arrays behind them)."""
    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=4, prefill_batch_size=2)
    gen.insert(prompts, max_tokens=[3, 5, 4])
    seen, steps = [], []
    while responses := gen.next_generated():
        arrays = set()
        for r in responses:
            row = r.logprobs
            if isinstance(row, RowLogprobs):
                arrays.add(id(row.batch))
                row = row.value()
            seen.append((r.uid, r.token, row.tolist()))
        steps.append((len(responses), len(arrays)))
    gen.close()
    return seen, steps


def test_row_logprobs_decode_the_tokens_and_logprobs_of_mlx_lm(model):
    prompts = [[5, 9, 14], [3, 22, 40, 41, 7], [8, 11]]
    theirs, _ = _steps(model, prompts)
    with batch_classes():
        ours, steps = _steps(model, prompts)
    assert [(u, t) for u, t, _ in ours] == [(u, t) for u, t, _ in theirs]
    for (_, _, a), (_, _, b) in zip(ours, theirs, strict=True):
        assert mx.allclose(mx.array(a), mx.array(b)).item()
    # Rows share their step's array (two where a prefilled batch just joined), never one each.
    assert all(1 <= arrays <= 2 for _, arrays in steps)
    assert any(rows >= 2 and arrays == 1 for rows, arrays in steps)
    # Swapped back afterwards: plain mlx-lm batches again.
    assert not isinstance(_steps(model, prompts)[0][0][2], RowLogprobs)


class _Counting:
    """A model that counts its forward passes."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_no_step_is_computed_after_every_row_reached_max_tokens(model):
    def run(counting):
        gen = BatchGenerator(counting, stop_tokens=[], completion_batch_size=4)
        gen.insert([[5, 9, 14], [3, 22, 40]], max_tokens=[4, 4])
        tokens = []
        while responses := gen.next_generated():
            tokens += [(r.uid, r.token, r.finish_reason) for r in responses]
        gen.close()
        return tokens

    theirs, ours = _Counting(model), _Counting(model)
    expected = run(theirs)
    with batch_classes():
        assert run(ours) == expected
    # mlx-lm computes a fifth token for each row and drops it.
    assert ours.calls == theirs.calls - 1


def test_finished_rows_caches_are_cut_out_when_read_as_mlx_lm_cuts_them(model, monkeypatch):
    prompts = [[5, 9, 14], [3, 22, 40, 41, 7], [8, 11]]

    def caches():
        gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=4, prefill_batch_size=4)
        uids = gen.insert(prompts, max_tokens=[3, 6, 6], caches=[row_cache(model) for _ in prompts])
        finished, removed = {}, {}
        while responses := gen.next_generated():
            finished.update({r.uid: r.prompt_cache for r in responses if r.finish_reason})
            if finished and not removed:
                # After the batch filtered out the first finished row: mlx-lm's other way out.
                out = gen.remove([uids[2]], return_prompt_caches=True)
                removed = {uid: cache for uid, (cache, _) in out.items()}
        gen.close()
        return finished, removed

    with batch_classes():
        ours = caches()
        # The same steps, with every row cut out layer by layer when it finishes (mlx-lm's way).
        monkeypatch.setattr(RowLogprobsBatch, "extract_cache", GenerationBatch.extract_cache)
        theirs = caches()
    assert all(isinstance(row, LaterRow) for row in ours[0].values())
    for mine, expected in zip(ours, theirs, strict=True):
        assert sorted(mine) == sorted(expected) and mine
        for uid, layers in mine.items():
            assert len(layers) == len(expected[uid])
            for a, b in zip(layers, expected[uid], strict=True):
                assert a.offset == b.offset
                assert mx.array_equal(a.keys, b.keys).item()
                assert mx.array_equal(a.values, b.values).item()


def test_a_prompt_batch_moving_on_whole_is_handed_over_and_a_part_is_split_as_mlx_lm_does(model):
    def prompted(cls):
        caches = [row_cache(model) for _ in range(3)]
        batch = cls(model, [0, 1, 2], caches, samplers=[None] * 3, logits_processors=[[]] * 3)
        batch.prompt([[5, 9, 14], [3, 22, 40], [8, 11, 12]])
        return batch

    ours, theirs = prompted(HandOverBatch), prompted(PromptProcessingBatch)
    layers = list(ours.prompt_cache)
    moved, expected = ours.split([2, 0, 1]), theirs.split([2, 0, 1])
    assert all(a is b for a, b in zip(moved.prompt_cache, layers, strict=True))  # no copy
    assert len(ours) == len(theirs) == 0 and ours.prompt_cache == []
    for got, want in ((moved, expected), (ours, theirs)):
        assert got.uids == want.uids and got.tokens == want.tokens
    for a, b in zip(moved.prompt_cache, expected.prompt_cache, strict=True):
        assert mx.array_equal(a.keys, b.keys).item() and mx.array_equal(a.offset, b.offset).item()

    ours, theirs = prompted(HandOverBatch), prompted(PromptProcessingBatch)
    part, expected = ours.split([1]), theirs.split([1])
    assert (part.uids, ours.uids) == (expected.uids, theirs.uids) == ([1], [0, 2])
    for got, want in ((part, expected), (ours, theirs)):
        for a, b in zip(got.prompt_cache, want.prompt_cache, strict=True):
            assert mx.array_equal(a.keys, b.keys).item()


def test_a_generator_run_never_deep_copies_a_prompt_batch_that_moves_on_whole(model, monkeypatch):
    def no_copy(self):
        raise AssertionError("prompt batch deep-copied")

    monkeypatch.setattr(PromptProcessingBatch, "_copy", no_copy)
    prompts = [[5, 9, 14], [3, 22, 40, 41, 7], [8, 11]]
    with batch_classes():
        steps, _ = _steps(model, prompts)
    assert len(steps) == 3 + 5 + 4
    with pytest.raises(AssertionError, match="deep-copied"):
        _steps(model, prompts)  # mlx-lm's own batches copy
