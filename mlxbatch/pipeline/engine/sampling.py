"""Seeded sampling for a whole batch in one op, and the per-row logits processors.

A sampled row's draw depends only on (seed, row id, sample index, step), never on what else
is in the batch. Greedy rows take the argmax. Logit bias, repetition penalty, grammar masks,
min-p and top-k are per-row processors.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from typing import Any

from mlxbatch.pipeline.engine.errors import UnsupportedMlxLm
from mlxbatch.records import Task


def _row_seed(task: Task) -> int:
    material = f"{task.params.seed}:{task.id}:{task.sample_index}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little")


def _step_key(seed: int, step: int) -> tuple[int, int]:
    """A row's key at one step: a splitmix64 mix of (row seed, step), as two uint32 words."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z >> 32, z & 0xFFFFFFFF


class _SampledRow:
    def __init__(self, task: Task):
        self.seed = _row_seed(task)
        self.temperature = task.params.temperature
        self.top_p = task.params.top_p
        self.step = 0


def calling_batch_uids(rows: int) -> list[int]:
    """The uids, in row order, of the mlx-lm GenerationBatch whose step called the sampler.

    mlx-lm hands a sampler only the batch's logprobs. The alternative, a logits processor per
    row that announces the row, makes mlx-lm slice the batch row by row every step.
    """
    caller = sys._getframe(2).f_locals.get("self")  # 0: here, 1: the sampler, 2: its caller
    uids = getattr(caller, "uids", None)
    if not isinstance(uids, list) or len(uids) != rows:
        raise UnsupportedMlxLm("this mlx-lm version calls samplers differently; pin mlx-lm<0.33")
    return uids


class SeededSampler:
    """One sampler object for every row of a run, so mlx-lm calls it once per batch step.

    A sampled row's draw is Gumbel-max with noise from its own key, a function of (seed, row
    id, sample index, step) alone: the same whatever else is in the batch, and one vmapped op
    for the whole batch. Greedy rows (not registered) take the argmax, as mlx-lm's default
    sampler does.
    """

    def __init__(self) -> None:
        self.rows: dict[int, _SampledRow] = {}

    def register(self, uid: int, task: Task) -> None:
        if task.params.temperature > 0:
            self.rows[uid] = _SampledRow(task)

    def forget(self, uid: int) -> None:
        self.rows.pop(uid, None)

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_top_p

        rows = [self.rows.get(uid) for uid in calling_batch_uids(logprobs.shape[0])]
        greedy = mx.argmax(logprobs, axis=-1)
        sampled = [r for r in rows if r is not None]
        if not sampled:
            return greedy
        keys = mx.array([_step_key(r.seed, r.step) if r else (0, 0) for r in rows], mx.uint32)
        for r in sampled:
            r.step += 1
        top_p = [r.top_p if r else 1.0 for r in rows]
        if min(top_p) < 1.0:
            p = mx.array(top_p)[:, None]
            logprobs = mx.where(p < 1.0, apply_top_p(logprobs, p), logprobs)
        inv_temp = mx.array([1.0 / r.temperature if r else 1.0 for r in rows])[:, None]
        vocab = logprobs.shape[-1]
        noise = mx.vmap(lambda k: mx.random.gumbel(shape=(vocab,), key=k))(keys)
        drawn = mx.argmax(logprobs * inv_temp + noise, axis=-1)
        return mx.where(mx.array([r is not None for r in rows]), drawn, greedy)


def row_processors(task: Task, masks: Any) -> list[Callable]:
    """The row's logits processors: logit bias, repetition penalty, its grammar mask, and for a
    sampled row, min-p and top-k (per-row filters that do not batch)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, make_repetition_penalty

    params = task.params
    processors: list[Callable] = []
    if params.logit_bias:
        ids = mx.array([i for i, _ in params.logit_bias])
        bias = mx.array([b for _, b in params.logit_bias])
        processors.append(lambda tokens, logits: logits.at[:, ids].add(bias.astype(logits.dtype)))
    if params.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(params.repetition_penalty, context_size=20))
    if params.constraint is not None:
        processors.append(_constraint_processor(params.constraint, masks))
    if params.temperature > 0 and params.min_p > 0.0:
        processors.append(lambda tokens, logits: apply_min_p(logits, params.min_p))
    if params.temperature > 0 and params.top_k > 0:
        processors.append(lambda tokens, logits: apply_top_k(logits, params.top_k))
    return processors


def _constraint_processor(constraint: dict, masks: Any) -> Callable:
    """A logits processor that masks every token the row's grammar does not allow next."""
    import mlx.core as mx

    row = masks.matcher(constraint)
    calls = [0]

    def process(tokens: Any, logits: Any) -> Any:
        # From the second step on, the last context token is the one sampled last step.
        sampled = int(tokens[-1].item()) if calls[0] else None
        calls[0] += 1
        allowed = mx.array(row.allowed(sampled))
        return mx.where(allowed, logits, mx.array(-float("inf"), logits.dtype))

    return process
