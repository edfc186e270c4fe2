"""Decode steps without mlx-lm's per-row split of the log-probabilities: same tokens, same
log-probabilities, one array per step behind every row's handle."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch

from mlxbatch.pipeline.engine import decode
from mlxbatch.pipeline.engine.cache import row_cache
from mlxbatch.pipeline.engine.decode import (
    HandOverBatch,
    LaterRow,
    RowLogprobs,
    RowLogprobsBatch,
    batch_classes,
)
from tests.conftest import read_jsonl, write_jsonl
from tests.test_cli_process import process


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


def _generate(model, prompts, max_tokens, *, ahead, stop_tokens=(), remove_after=None):
    """Every response (uid, token, finish reason, logprobs row) of a run whose rows all join
    at once; with `ahead`, the batch may queue steps ahead once none is left to join. Also
    returns the most steps found queued ahead at any step, and the forward passes run."""
    counting = _Counting(model)
    gen = BatchGenerator(
        counting,
        stop_tokens=[[t] for t in stop_tokens],
        completion_batch_size=8,
        prefill_batch_size=8,
    )
    if ahead:
        gen._generation_batch.rows_coming = lambda: bool(
            gen._unprocessed_sequences or len(gen._prompt_batch)
        )
    uids = gen.insert(prompts, max_tokens=max_tokens)
    seen, most = [], 0
    while responses := gen.next_generated():
        most = max(most, len(gen._generation_batch._ahead))
        seen += [(r.uid, r.token, r.finish_reason, r.logprobs.value().tolist()) for r in responses]
        if remove_after is not None and len(seen) >= remove_after and uids:
            gen.remove([uids.pop(1)])  # a stop string's way out, mid-run
            remove_after = None
    gen.close()
    return seen, most, counting.calls


@pytest.mark.parametrize("stop", [(), (17,)])
def test_steps_queued_ahead_decode_what_one_step_at_a_time_decodes(model, stop):
    prompts = [[5, 9, 14], [3, 22, 40, 41, 7], [8, 11], [2, 30, 31, 12]]
    args = (model, prompts, [3, 11, 6, 9])
    with batch_classes():
        theirs, none_ahead, their_calls = _generate(*args, ahead=False, stop_tokens=stop)
        ours, most, our_calls = _generate(*args, ahead=True, stop_tokens=stop)
        removed, _, _ = _generate(*args, ahead=True, stop_tokens=stop, remove_after=6)
        expected, _, _ = _generate(*args, ahead=False, stop_tokens=stop, remove_after=6)
    assert none_ahead == 0 and most > 1
    assert [r[:3] for r in ours] == [r[:3] for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert mx.allclose(mx.array(a[3]), mx.array(b[3])).item()
    assert [r[:3] for r in removed] == [r[:3] for r in expected]
    if not stop:  # no step past the longest row's max_tokens
        assert our_calls == their_calls


def test_no_step_is_queued_ahead_while_rows_can_still_join(model):
    # Two prompts per prefill batch: later rows join a batch that is decoding already, which
    # raises if steps were queued ahead of it (RowLogprobsBatch.extend).
    def run(ahead):
        gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=8, prefill_batch_size=2)
        if ahead:
            gen._generation_batch.rows_coming = lambda: bool(
                gen._unprocessed_sequences or len(gen._prompt_batch)
            )
        gen.insert([[5, 9, 14], [3, 22, 40], [8, 11], [2, 30, 31], [4, 4]], max_tokens=[12] * 5)
        tokens, most = [], 0
        while responses := gen.next_generated():
            most = max(most, len(gen._generation_batch._ahead))
            tokens += [(r.uid, r.token, r.finish_reason) for r in responses]
        gen.close()
        return tokens, most

    with batch_classes():
        (ours, most), (theirs, _) = run(True), run(False)
    assert ours == theirs
    assert most > 0  # once the last rows joined


def test_a_run_writes_the_same_outputs_with_steps_queued_ahead(tmp_path, tiny_model, monkeypatch):
    rows = [{"id": i, "text": " ".join(["word"] * (2 + i % 5)) + f" {i}"} for i in range(12)]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    args = ["--template", "Text: {{ text }}", "--system", "You label short texts. " * 8]
    args += ["--max-tokens", "9", "--temperature", "0.8", "-n", "2", "--stop", "e"]
    queued = []
    real = RowLogprobsBatch._queue

    def counted(self, inputs):
        queued.append(len(self._ahead))
        return real(self, inputs)

    monkeypatch.setattr(RowLogprobsBatch, "_queue", counted)
    outputs = {}
    for ahead in (0, decode.LOOKAHEAD):
        monkeypatch.setattr(decode, "LOOKAHEAD", ahead)
        out, queued[:] = tmp_path / f"{ahead}.jsonl", []
        result = process(str(f), "-m", tiny_model, *args, "-o", str(out))
        assert result.exit_code == 0, result.output
        outputs[ahead] = [(r["id"], r["output"], r["finish_reason"]) for r in read_jsonl(out)]
        assert (max(queued) > 0) == bool(ahead)  # steps were queued behind queued steps
    assert outputs[0] == outputs[decode.LOOKAHEAD]
    assert {reason for _, _, reason in outputs[0]} == {"length", "stop"}  # both ways out
