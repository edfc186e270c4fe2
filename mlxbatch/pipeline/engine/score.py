"""Choice scoring: the log-probability of each of a task's choices after its prompt.

A task constrained to a list of choices is not generated: its prompt is prefilled once (its
group's shared prefix once per group) and every choice, followed by end of text, is scored in
one batched forward pass. It does not turn scores into a label (pipeline/constrain.py does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlxbatch.pipeline.engine.errors import StepFailures, error_result, is_oom
from mlxbatch.pipeline.engine.prefix import prefill
from mlxbatch.records import PrefixGroup, Result, Task


def score_choices(
    engine: Any,
    groups: list[PrefixGroup],
    on_scores: Callable[[Task, list[float], list[int]], None],
    on_error: Callable[[Result], None],
    should_stop: Callable[[], bool],
) -> bool:
    """Score every task's choices (then end of text) after its prompt.

    `on_scores(task, logprobs, choice_lengths)` is called per task (`on_error` with an
    error record for a task that fails, e.g. out of memory). Returns False if `should_stop`
    cut it short.
    """
    eos = engine.eos_ids[0] if engine.eos_ids else None
    failures = StepFailures(1)  # one task at a time; it raises when every task fails alike
    for group in groups:
        prefix = engine.prefill_prefixes([group.prefix])[0] if group.prefix else None
        for task in group.tasks:
            if should_stop():
                return False
            choices = (task.params.constraint or {})["choices"]
            seqs = [list(engine.tokenizer.encode(c, add_special_tokens=False)) for c in choices]
            ends = [seq + ([eos] if eos is not None else []) for seq in seqs]
            try:
                scores = _score(engine.model, task.prompt_ids, group.prefix, prefix, ends)
            except (RuntimeError, MemoryError, ValueError) as e:
                mx.clear_cache()
                failures.failed(e)
                code = "out_of_memory" if is_oom(e) else "generation_error"
                on_error(error_result(task, code, str(e)))
                continue
            failures.finished()
            engine.stats.prompt_tokens += len(task.prompt_ids)
            on_scores(task, scores, [len(s) for s in seqs])
    return True


def _score(
    model: Any, prompt: list[int], prefix: list[int], prefix_cache: Any, seqs: list[list[int]]
) -> list[float]:
    cache = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in cache):
        raise ValueError("choices need a model with a plain KV cache")
    start = 0
    if prefix_cache is not None:
        for c, p in zip(cache, prefix_cache, strict=True):
            c.state = (p.keys[..., : p.offset, :], p.values[..., : p.offset, :], p.offset)
        start = len(prefix)
    rest = mx.array(prompt[start:-1])[None]
    prefill(model, rest, cache)
    # One row per choice: the prompt's last token, then the choice's tokens.
    width = max(len(s) for s in seqs)
    rows = [[prompt[-1], *s] + [0] * (width - len(s)) for s in seqs]
    batch = []
    for c in cache:
        keys, values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        expanded = KVCache()
        if c.offset:
            expanded.state = (
                mx.repeat(keys, len(seqs), axis=0),
                mx.repeat(values, len(seqs), axis=0),
                c.offset,
            )
        batch.append(expanded)
    logits = model(mx.array(rows), cache=batch).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    targets = mx.array([s + [0] * (width - len(s)) for s in seqs])[..., None]
    picked = mx.take_along_axis(logprobs[:, :width, :], targets, axis=-1)[..., 0]
    valid = mx.array([[1.0] * len(s) + [0.0] * (width - len(s)) for s in seqs])
    scores: list[float] = (picked * valid).sum(axis=1).tolist()  # type: ignore[assignment]
    return scores
