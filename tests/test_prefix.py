"""Prefix caches: many prefixes prefilled in padded batches equal prefixes prefilled alone;
rows after a prefix prefilled in batches of similar length generate what mlx-lm generates."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load

from mlxbatch.pipeline.engine import prefix as prefix_module
from mlxbatch.pipeline.engine.cache import RowBatchKVCache
from mlxbatch.pipeline.engine.decode import batch_classes
from mlxbatch.pipeline.engine.prefix import _batches, prefill, prefill_prefixes, prefill_rows
from mlxbatch.pipeline.engine.row_kv import PrefilledRow, RowKVCache, row_cache
from tests.conftest import WORDS, read_jsonl, write_jsonl
from tests.test_cli_process import process
from tests.test_row_cache import _generate, _prefilled


@pytest.fixture(scope="module")
def model(tiny_model):
    return load(tiny_model)[0]


def test_batches_pad_to_the_longest_row_within_the_token_budget():
    assert list(_batches([5, 12, 3, 12, 30], 40)) == [[2, 0, 1], [3], [4]]
    assert list(_batches([50], 40)) == [[0]]  # a row longer than the budget runs alone
    assert list(_batches([], 40)) == []
    # Rows after a shared prefix also close a batch once padding passes a share of its tokens.
    assert list(_batches([10, 11, 12, 30, 31, 100], 1000, 0.125)) == [[0, 1, 2], [3, 4], [5]]


def test_batched_prefixes_hold_the_keys_of_prefixes_prefilled_alone(model):
    prefixes = [[7 + i % 50 for i in range(n)] for n in (5, 12, 3, 12, 30)]
    batched = prefill_prefixes(model, prefixes, share_prefix=True, tokens_per_step=40)
    for prefix, cache in zip(prefixes, batched, strict=True):
        alone = row_cache(model)
        prefill(model, mx.array([prefix]), alone)
        for ours, theirs in zip(cache, alone, strict=True):
            assert isinstance(ours, RowKVCache) and ours.share_prefix
            assert ours.offset == theirs.offset == len(prefix)
            n = len(prefix)
            assert mx.allclose(ours.keys[..., :n, :], theirs.keys[..., :n, :], atol=1e-5).item()
            assert mx.allclose(ours.values[..., :n, :], theirs.values[..., :n, :], atol=1e-5).item()


def test_many_prefix_groups_give_the_greedy_output_of_no_reuse(tmp_path, tiny_model):
    # Six system prompts of different lengths, four rows each: six prefixes, several batches.
    rows = [
        {
            "id": f"{s}-{r}",
            "messages": [
                {"role": "system", "content": " ".join(WORDS[: 4 + 3 * s] * (1 + s))},
                {"role": "user", "content": " ".join(WORDS[r : r + 3 + s])},
            ],
        }
        for s in range(6)
        for r in range(4)
    ]
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    outs = {}
    for flag in ("--prefix-cache", "--no-prefix-cache"):
        o = tmp_path / f"{flag}.jsonl"
        args = [str(f), "-m", tiny_model, "--max-tokens", "6", "-o", str(o), flag]
        assert process(*args).exit_code == 0
        outs[flag] = read_jsonl(o)
    assert outs["--prefix-cache"] == outs["--no-prefix-cache"]
    assert len({r["output"] for r in outs["--prefix-cache"]}) > 1


PREFIX = [5, 9, 14, 3, 22, 40, 41]
# Own tokens of very different lengths, one of a single token (nothing to prefill but the
# first-token pass), in length order as plan.py hands them over.
SUFFIXES = [[7], [8, 11], [50, 51, 52], [30, 31, 32, 33, 34, 35], [60 + i for i in range(14)]]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_rows_prefilled_in_length_batches_generate_the_tokens_of_whole_prompts(model, share_prefix):
    theirs = _generate(model, [PREFIX + s for s in SUFFIXES])
    prefix = _prefilled(model, PREFIX, share_prefix=share_prefix)
    # A budget of 12 tokens a step: the rows go in several batches.
    rows = prefill_rows(model, prefix, [s[:-1] for s in SUFFIXES], tokens_per_step=12)
    assert len({id(r[0].batch) for r in rows}) == 1
    ours = _generate(model, [s[-1:] for s in SUFFIXES], caches=rows, prefill=len(rows))
    assert ours == theirs


def test_a_pass_over_rows_after_a_prefix_stays_within_its_own_cap(model, monkeypatch):
    """The engine's prefill budget may be larger; ROWS_TOKENS_PER_PASS still cuts the passes."""
    suffixes = [[20 + i, 30 + i, 40 + i, 50 + i, 60 + i, 70 + i] for i in range(5)]
    theirs = _generate(model, [PREFIX + s for s in suffixes])
    passes = []
    real = prefix_module.prefill

    def spy(model, ids, cache, **kw):
        passes.append(ids.size)
        real(model, ids, cache, **kw)

    monkeypatch.setattr(prefix_module, "prefill", spy)
    monkeypatch.setattr(prefix_module, "ROWS_TOKENS_PER_PASS", 12)
    prefix = _prefilled(model, PREFIX, share_prefix=True)
    # Rows of one length, so no pass closes for padding: 5 rows of 5 tokens, 2 rows a pass.
    rows = prefill_rows(model, prefix, [s[:-1] for s in suffixes], tokens_per_step=1000)
    assert passes == [10, 10, 5]
    ours = _generate(model, [s[-1:] for s in suffixes], caches=rows, prefill=len(rows))
    assert ours == theirs


@pytest.mark.parametrize("wait", [True, False])
def test_prefill_queues_each_step_before_waiting_for_the_one_ahead(model, monkeypatch, wait):
    steps: dict[int, int] = {}
    calls: list[tuple[str, int]] = []
    real_async, real_eval = mx.async_eval, mx.eval

    def queue(arrays):
        steps[id(arrays)] = len(steps)
        calls.append(("queue", steps[id(arrays)]))
        real_async(arrays)

    def wait_for(arrays):
        calls.append(("wait", steps[id(arrays)]))
        real_eval(arrays)

    monkeypatch.setattr(prefix_module, "PREFILL_STEP", 3)
    monkeypatch.setattr(mx, "async_eval", queue)
    monkeypatch.setattr(mx, "eval", wait_for)
    cache = row_cache(model)
    prefill(model, mx.array([PREFIX]), cache, wait=wait)  # 7 tokens: 3 steps
    expected = [("queue", 0), ("queue", 1), ("wait", 0), ("queue", 2), ("wait", 1)]
    assert calls == expected + ([("wait", 2)] if wait else [])
    monkeypatch.undo()
    whole = _prefilled(model, PREFIX)[-1]
    assert mx.allclose(cache[-1].keys[..., :7, :], whole.keys[..., :7, :], atol=1e-4).item()


@pytest.mark.parametrize("order", [list(range(len(SUFFIXES))), [3, 0, 4, 2, 1]])
def test_rows_after_a_prefix_decode_without_reading_their_padding_from_the_device(
    model, monkeypatch, order
):
    """A read of the padding waits for every pass queued before it; the host keeps it, so
    mlx-lm's first decode steps are built while the rows' prefill still runs."""
    suffixes = [SUFFIXES[i] for i in order]
    theirs = _generate(model, [PREFIX + s for s in suffixes])
    reads = []
    known = RowBatchKVCache._known_padding

    def spy(self):
        padding = known(self)
        reads.append(padding is None)
        return padding

    monkeypatch.setattr(RowBatchKVCache, "_known_padding", spy)
    prefix = _prefilled(model, PREFIX, share_prefix=True)
    rows = prefill_rows(model, prefix, [s[:-1] for s in suffixes], tokens_per_step=12)
    with batch_classes():
        ours = _generate(model, [s[-1:] for s in suffixes], caches=rows, prefill=len(rows))
    assert ours == theirs
    assert reads and not any(reads)


def test_prefilled_rows_merge_back_without_a_copy_and_mix_with_other_rows(model):
    prefix = _prefilled(model, PREFIX, share_prefix=True)
    rows = prefill_rows(model, prefix, [s[:-1] for s in SUFFIXES], tokens_per_step=12)
    stacked = rows[0][0].batch
    assert PrefilledRow.merge([r[0] for r in rows]) is stacked
    # Some rows only, out of order: a new cache of those rows; the stacked one is unchanged.
    picked = PrefilledRow.merge([rows[4][0], rows[1][0]])
    assert picked is not stacked and stacked.keys.shape[0] == len(SUFFIXES)
    for ours, row in zip((0, 1), (4, 1), strict=True):
        assert mx.array_equal(picked.keys[ours], stacked.keys[row]).item()
        assert picked.offset[ours].item() == stacked.offset[row].item()
    # A row of another group in the same merge: the rows are joined as mlx-lm joins batches.
    other = _prefilled(model, [70, 71, 72])
    mixed = RowKVCache.merge([other[0], rows[1][0], rows[2][0]])
    assert isinstance(mixed, RowBatchKVCache) and mixed.offset.tolist() == [
        3,
        len(PREFIX) + 1,
        len(PREFIX) + 2,
    ]


def test_a_group_larger_than_a_decode_batch_reuses_its_prefix_batch_after_batch(
    tmp_path, tiny_model
):
    system = " ".join(WORDS[:40])
    rows = [
        {"id": i, "messages": [{"role": "system", "content": system},
                               {"role": "user", "content": " ".join(WORDS[i : i + 1 + i % 5])}]}
        for i in range(11)
    ]  # fmt: skip
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    outs = {}
    for flag in ("--prefix-cache", "--no-prefix-cache"):
        o = tmp_path / f"{flag}.jsonl"
        args = [str(f), "-m", tiny_model, "--max-tokens", "5", "--batch-size", "4", "-o", str(o)]
        assert process(*args, flag, "--repetition-penalty", "1.5").exit_code == 0
        outs[flag] = read_jsonl(o)
    assert outs["--prefix-cache"] == outs["--no-prefix-cache"]
    assert len({r["output"] for r in outs["--prefix-cache"]}) > 1


def test_rows_of_many_prefixes_merge_in_one_copy_into_the_plain_layout(model, monkeypatch):
    prefixes = [PREFIX, PREFIX[:4], [60, 61, 62, 63, 64]]
    groups = [
        prefill_rows(
            model, _prefilled(model, p, share_prefix=True), [[7, 8], [9]], tokens_per_step=64
        )
        for p in prefixes
    ]

    def no_extend(self, other):
        raise AssertionError("merged part by part")

    monkeypatch.setattr(RowBatchKVCache, "extend", no_extend)
    merged = PrefilledRow.merge([rows[0] for group in groups for rows in group])
    assert merged.prefix is None and merged.keys.shape[0] == 6
    # Each row: its prefix and own tokens, right-aligned at the longest.
    assert merged.offset.tolist() == [len(p) + n for p in prefixes for n in (2, 1)]
    assert merged._idx == len(PREFIX) + 2
    assert merged.left_padding.tolist() == [merged._idx - n for n in merged.offset.tolist()]
    second = groups[2][1][0].batch
    start = merged._idx - (5 + 1)
    assert mx.array_equal(merged.keys[5, :, start : start + 5], second.prefix[0][0]).item()
