"""Decode steps without mlx-lm's per-row split of the log-probabilities: same tokens, same
log-probabilities, one array per step behind every row's handle."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator

from mlxbatch.pipeline.engine.decode import RowLogprobs, row_logprobs


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
    with row_logprobs():
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
    with row_logprobs():
        assert run(ours) == expected
    # mlx-lm computes a fifth token for each row and drops it.
    assert ours.calls == theirs.calls - 1
