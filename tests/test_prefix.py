"""Prefix caches: many prefixes prefilled in padded batches equal prefixes prefilled alone."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load

from mlxbatch.pipeline.engine.cache import RowKVCache, row_cache
from mlxbatch.pipeline.engine.prefix import _batches, prefill, prefill_prefixes
from tests.conftest import WORDS, read_jsonl, write_jsonl
from tests.test_cli_process import process


@pytest.fixture(scope="module")
def model(tiny_model):
    return load(tiny_model)[0]


def test_batches_pad_to_the_longest_row_within_the_token_budget():
    assert list(_batches([5, 12, 3, 12, 30], 40)) == [[2, 0, 1], [3], [4]]
    assert list(_batches([50], 40)) == [[0]]  # a row longer than the budget runs alone
    assert list(_batches([], 40)) == []


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
