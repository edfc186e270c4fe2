"""The shared seeded sampler reads its rows from the mlx-lm batch that calls it, or refuses."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxbatch.pipeline.engine import UnsupportedMlxLm, sampling
from tests.conftest import write_jsonl
from tests.test_cli_process import process


def test_sampler_called_from_anything_but_a_batch_step_refuses():
    with pytest.raises(UnsupportedMlxLm, match="calls samplers differently"):
        sampling.SeededSampler()(mx.zeros((2, 5)))


def test_a_changed_sampler_call_fails_the_run_cleanly(tmp_path, tiny_model, monkeypatch):
    """Not retried as a failing step and not turned into error records: exit 1, one line."""

    def changed(rows: int) -> list[int]:
        raise UnsupportedMlxLm("this mlx-lm version calls samplers differently; pin mlx-lm<0.33")

    monkeypatch.setattr(sampling, "calling_batch_uids", changed)
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hi", "temperature": 0.7}])
    result = process(str(f), "-m", tiny_model, "--max-tokens", "3")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: this mlx-lm version calls samplers differently; pin mlx-lm<0.33\n"
    )


def _splitmix_reference(seed: int, step: int) -> tuple[int, int]:
    """splitmix64 of (seed, step) one row at a time, as the sampler's keys are defined."""
    m = (1 << 64) - 1
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return z >> 32, z & 0xFFFFFFFF


def test_step_keys_are_splitmix64_of_seed_and_step():
    import random

    import numpy as np

    rng = random.Random(3)
    seeds = [0, 1, (1 << 64) - 1] + [rng.getrandbits(64) for _ in range(200)]
    steps = [0, (1 << 20), 7] + [rng.randrange(100_000) for _ in range(200)]
    keys = sampling.step_keys(np.array(seeds, np.uint64), np.array(steps, np.uint64))
    assert keys.dtype == np.uint32
    assert [tuple(k) for k in keys.tolist()] == [
        _splitmix_reference(s, t) for s, t in zip(seeds, steps, strict=True)
    ]


class _Batch:
    """Stands in for mlx-lm's GenerationBatch: the sampler reads `uids` off its caller."""

    def __init__(self, uids: list[int], sampler: sampling.SeededSampler):
        self.uids, self.sampler = uids, sampler

    def step(self, logprobs: mx.array) -> list[int]:
        return self.sampler(logprobs).tolist()


def _row_logprobs(uid: int, step: int) -> mx.array:
    logits = mx.random.normal((64,), key=mx.random.key(1000 * uid + step))
    return logits - mx.logsumexp(logits)


def _task(uid: int, temperature: float, top_p: float = 1.0):
    from mlxbatch.records import GenParams, Task

    params = GenParams(temperature=temperature, top_p=top_p, seed=5)
    return Task(key=f"k{uid}", seq=uid, line=uid, id=f"row{uid}", sample_index=0,
                prompt_ids=[1], params=params)  # fmt: skip


def test_a_rows_draws_do_not_depend_on_the_batch_it_is_in():
    """Rows sampled alone draw what they draw in a batch whose composition changes (rows
    finish, a greedy row sits in between), step for step; the greedy row takes the argmax."""
    tasks = {1: _task(1, 0.8), 2: _task(2, 0.0), 3: _task(3, 1.3, top_p=0.9), 4: _task(4, 0.5)}

    alone = {}
    for uid, task in tasks.items():
        sampler = sampling.SeededSampler()
        sampler.register(uid, task)
        batch = _Batch([uid], sampler)
        alone[uid] = [batch.step(_row_logprobs(uid, s)[None])[0] for s in range(6)]

    sampler = sampling.SeededSampler()
    for uid, task in tasks.items():
        sampler.register(uid, task)
    together: dict[int, list[int]] = {uid: [] for uid in tasks}
    compositions = [[1, 2, 3, 4]] * 2 + [[1, 2, 4]] * 2 + [[4, 1, 2]] * 2
    for s, uids in enumerate(compositions):
        drawn = _Batch(uids, sampler).step(mx.stack([_row_logprobs(u, s) for u in uids]))
        for uid, token in zip(uids, drawn, strict=True):
            together[uid].append(token)
    assert together[1] == alone[1] and together[4] == alone[4]
    assert together[3] == alone[3][:2]
    assert together[2] == alone[2] == [int(mx.argmax(_row_logprobs(2, s))) for s in range(6)]
    assert len(set(alone[1])) > 1  # sampled, not greedy
