"""Batch sizes a window is generated with: prefill batches sized by what mlx-lm prefills."""

from __future__ import annotations

from mlxbatch.jobs.dispatch import generate_window
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.records import GenParams, Task

PREFIX = list(range(1, 101))


class SizingEngine:
    """What generate_window asks of an engine to size batches; records what it is given."""

    kv_bytes_per_token = 1000
    prefill_tokens_per_step = 512
    max_completion_batch = 512

    def __init__(self, prefills_rows: bool, budget: int = 10**9, shares_prefixes: bool = True):
        self.prefills_rows = prefills_rows
        self.budget, self.shares_prefixes = budget, shares_prefixes
        self.sizes: list[tuple[int, int]] = []

    def memory_budget(self) -> int:
        return self.budget

    def generate(self, groups, *, completion_batch_size, prefill_batch_size, **kwargs) -> bool:
        self.sizes.append((completion_batch_size, prefill_batch_size))
        return True


def _rows(n: int) -> list[Task]:
    return [
        Task(f"k{i}", i, i + 1, i, 0, PREFIX + [200 + i] * 150, GenParams(max_tokens=8))
        for i in range(n)
    ]


def test_rows_the_engine_prefills_after_their_prefix_reach_mlx_lm_in_one_prefill_batch():
    sizes = {}
    for prefills_rows in (True, False):
        engine = SizingEngine(prefills_rows)
        generate_window(_rows(64), JobSpec(), engine, lambda r: None, lambda: False)
        sizes[prefills_rows] = engine.sizes
    # The engine leaves mlx-lm one token a row: a whole decode batch in one pass, not 512 // 150 = 3 rows.
    assert sizes == {True: [(512, 512)], False: [(512, 3)]}
    engine = SizingEngine(True)
    no_reuse = JobSpec(prefix_cache=False)
    generate_window(_rows(64), no_reuse, engine, lambda r: None, lambda: False)
    assert engine.sizes == [(512, 2)]  # whole prompts of 250 tokens


def test_the_engines_decode_batch_limit_bounds_the_decode_batch():
    engine = SizingEngine(True)
    engine.max_completion_batch = 2048  # as on CUDA
    generate_window(_rows(3000), JobSpec(), engine, lambda r: None, lambda: False)
    assert engine.sizes == [(2048, 512)]  # prefill: 512 tokens a step, one token a row
    engine = SizingEngine(True)
    engine.max_completion_batch = 2048
    generate_window(_rows(3000), JobSpec(batch_size=100), engine, lambda r: None, lambda: False)
    assert engine.sizes == [(100, 100)]  # --batch-size still lowers it


def test_the_engine_decodes_up_to_2048_rows_on_cuda_and_512_elsewhere(tiny_model, monkeypatch):
    from mlxbatch.pipeline.engine import model

    assert model.Engine(tiny_model).max_completion_batch == 512  # these tests run on the CPU
    monkeypatch.setattr(model, "on_cuda", lambda: True)
    assert model.Engine(tiny_model).max_completion_batch == 2048


def test_a_prefix_every_row_shares_counts_once_against_the_memory_budget():
    # Rows of 100 shared + 150 own prompt tokens + 8 new, 1 kB each; a 10 MB budget.
    sizes = {}
    for shares in (True, False):
        engine = SizingEngine(True, budget=10_000_000, shares_prefixes=shares)
        generate_window(_rows(64), JobSpec(), engine, lambda r: None, lambda: False)
        sizes[shares] = engine.sizes
    # Held once: (10 MB - 100 kB) // 158 kB = 62 rows; each row its own copy: 10 MB // 258 kB.
    assert sizes == {True: [(62, 62)], False: [(38, 38)]}
    # Rows of two prefixes share a batch, and then each row holds its whole prompt.
    two = _rows(32) + [
        Task(
            f"j{i}",
            40 + i,
            41 + i,
            40 + i,
            0,
            [999] * 100 + [300 + i] * 150,
            GenParams(max_tokens=8),
        )
        for i in range(32)
    ]
    engine = SizingEngine(True, budget=10_000_000)
    generate_window(two, JobSpec(), engine, lambda r: None, lambda: False)
    assert engine.sizes == [(38, 38)]
