"""Unit tests of pipeline/plan.py over list literals."""

import random

from mlxbatch.pipeline.plan import (
    _common_length,
    choose_batch_sizes,
    context_error,
    group_by_prefix,
    sort_by_length,
)
from mlxbatch.records import GenParams, Task


def task(i: int, ids: list[int], max_tokens: int = 8) -> Task:
    return Task(
        key=f"k{i}",
        seq=i,
        line=i + 1,
        id=i,
        sample_index=0,
        prompt_ids=ids,
        params=GenParams(max_tokens=max_tokens),
    )


def test_sort_by_length_is_stable():
    tasks = [task(0, [1, 2, 3]), task(1, [1]), task(2, [4, 5, 6]), task(3, [2, 2])]
    assert [t.seq for t in sort_by_length(tasks)] == [1, 3, 0, 2]


def test_context_errors():
    assert context_error(task(0, []), 100)[0] == "empty_prompt"
    assert context_error(task(0, [1] * 100), 100)[0] == "context_length_exceeded"
    assert context_error(task(0, [1] * 95, max_tokens=10), 100)[0] == "max_tokens_too_large"
    assert context_error(task(0, [1] * 90, max_tokens=10), 100) is None


def test_batch_sizes_follow_the_memory_budget():
    tasks = [task(i, [1] * 100, max_tokens=100) for i in range(10)]
    sizes = choose_batch_sizes(tasks, kv_bytes_per_token=1000, memory_budget=2_000_000)
    assert sizes.completion == 10  # 2 MB / (200 tokens * 1 kB)
    assert choose_batch_sizes(tasks, kv_bytes_per_token=1000, memory_budget=10**9).completion == 512
    sizes = choose_batch_sizes(tasks, kv_bytes_per_token=1000, memory_budget=10**9, most=2048)
    assert sizes.completion == 2048
    sizes = choose_batch_sizes(tasks, kv_bytes_per_token=1000, memory_budget=10**6, most=2048)
    assert sizes.completion == 5  # the budget still binds: 1 MB / (200 tokens * 1 kB)
    sizes = choose_batch_sizes(tasks, kv_bytes_per_token=1000, memory_budget=10**6, held_once=90)
    assert sizes.completion == 8  # (1 MB - 90 kB held once) / (110 tokens * 1 kB)
    assert (
        choose_batch_sizes(tasks, kv_bytes_per_token=1000, memory_budget=10**9, cap=4).completion
        == 4
    )
    assert (
        choose_batch_sizes(
            tasks, kv_bytes_per_token=1, memory_budget=10**9, prefill_tokens=1
        ).prefill
        == 1
    )
    assert (
        choose_batch_sizes(
            tasks, kv_bytes_per_token=1, memory_budget=10**9, prefill_tokens=1000
        ).prefill
        == 10
    )


def test_prefix_groups_prefer_the_biggest_saving():
    system = list(range(100, 140))
    a, b = system[:20] + list(range(500, 600)), system[:20] + list(range(700, 800))
    samples = [task(i, a) for i in range(4)] + [task(10 + i, b) for i in range(4)]
    groups = group_by_prefix(samples)
    # n samples of one prompt share everything but the last token.
    assert sorted((len(g.prefix), len(g.tasks)) for g in groups) == [(119, 4), (119, 4)]
    shared = [task(i, system + [i, i + 1]) for i in range(5)] + [task(9, [7, 8, 9])]
    groups = group_by_prefix(shared)
    assert [(len(g.prefix), sorted(t.seq for t in g.tasks)) for g in groups] == [
        (40, [0, 1, 2, 3, 4]),
        (0, [9]),
    ]
    assert group_by_prefix([]) == []


def test_common_length_matches_a_plain_scan():
    rng = random.Random(0)
    for _ in range(500):
        head = [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
        a = head + [rng.randrange(4) for _ in range(rng.randrange(0, 10))]
        b = head + [rng.randrange(4) for _ in range(rng.randrange(0, 10))]
        pairs = enumerate(zip(a, b, strict=False))
        expected = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
        assert _common_length(a, b) == expected
