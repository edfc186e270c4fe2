"""Hand a window of tasks to the engine and complete what comes back.

Choice tasks are scored (every choice in one batched pass) and labelled here; the rest are
generated in length-sorted, prefix-grouped batches. Constrained JSON outputs are parsed and
checked against their schema. The engine and its token masks are passed in; no store or file
is touched here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mlxbatch.jobs.spec import JobSpec
from mlxbatch.pipeline import constrain, plan
from mlxbatch.records import PrefixGroup, Result, Task


def generate_window(
    todo: list[Task],
    spec: JobSpec,
    engine: Any,
    on_result: Callable[[Result], None],
    should_stop: Callable[[], bool],
    on_batch_size: Callable[[int], None] = lambda size: None,
) -> None:
    """Score choice tasks, then generate the rest in length-sorted, prefix-grouped batches."""

    def grouped(tasks: list[Task]) -> list[PrefixGroup]:
        ordered = plan.sort_by_length(tasks)
        return plan.group_by_prefix(ordered) if spec.prefix_cache else [PrefixGroup([], ordered)]

    choice_tasks = [t for t in todo if _constraint_type(t) == "choices"]
    if choice_tasks:
        engine.score_choices(
            grouped(choice_tasks),
            on_scores=lambda task, lps, lengths: on_result(_choice_result(task, lps, lengths)),
            on_error=on_result,
            should_stop=should_stop,
        )
    rest = [t for t in todo if _constraint_type(t) != "choices"]
    if not rest or should_stop():
        return
    groups = grouped(rest)
    sizes = plan.choose_batch_sizes(
        rest,
        kv_bytes_per_token=engine.kv_bytes_per_token,
        memory_budget=engine.memory_budget(),
        cap=spec.batch_size,
        most=engine.max_completion_batch,
        held_once=_held_once(groups, engine),
        prefill_tokens=engine.prefill_tokens_per_step,
        prefilled=[_prefilled_by_mlx_lm(t, g, engine) for g in groups for t in g.tasks],
    )
    if spec.prefill_batch_size:
        sizes = plan.BatchSizes(sizes.completion, min(spec.prefill_batch_size, sizes.completion))
    on_batch_size(sizes.completion)
    by_key = {t.key: t for t in rest}
    constrained = any(t.params.constraint for t in rest)
    engine.generate(
        groups,
        completion_batch_size=sizes.completion,
        prefill_batch_size=sizes.prefill,
        on_result=lambda r: on_result(_parsed(by_key[r.key], r)),
        should_stop=should_stop,
        masks=_token_masks(engine) if constrained else None,
    )


def _prefilled_by_mlx_lm(task: Task, group: PrefixGroup, engine: Any) -> int:
    """Prompt tokens mlx-lm's prefill batches see for a task: those after its group's prefix,
    or just the last where the engine prefills the rest itself. (Sizing prefill batches by
    the rows' ~150 tokens each made them 3 rows on a CPU, and 512 rows took 172 passes.)"""
    if group.prefix and engine.prefills_rows:
        return 1
    return len(task.prompt_ids) - len(group.prefix)


def _held_once(groups: list[PrefixGroup], engine: Any) -> int:
    """Prompt tokens each decode batch holds once for all its rows: a prefix every task shares.
    (Batches that take rows of several prefixes hold each row's whole prompt, cache.py.)"""
    if len(groups) == 1 and groups[0].prefix and engine.shares_prefixes:
        return len(groups[0].prefix)
    return 0


def _constraint_type(task: Task) -> str | None:
    constraint = task.params.constraint
    return constraint["type"] if constraint else None


def _token_masks(engine: Any) -> constrain.TokenMasks:
    # Building llguidance's tokenizer takes about a second: once per engine.
    if getattr(engine, "token_masks", None) is None:
        vocab = int(engine.config.get("vocab_size") or len(engine.tokenizer))
        hf = engine.tokenizer._tokenizer
        engine.token_masks = constrain.TokenMasks(hf, vocab, engine.eos_ids)
    return engine.token_masks


def _parsed(task: Task, result: Result) -> Result:
    """Attach the parsed JSON of a constrained row, or its error (output cut off, ...)."""
    if result.finish_reason == "error":
        return result
    value, error = constrain.parse_output(task.params.constraint, result.text, result.finish_reason)
    if error is not None:
        result.error_code = error
        result.error_message = ERROR_MESSAGES[error]
    elif value is not None:
        result.extra["parsed"] = value
    return result


ERROR_MESSAGES = {
    "incomplete_json": "the output reached max_tokens before the JSON was complete",
    "invalid_json": "the output is not valid JSON",
    "schema_mismatch": "the output does not match the schema",
}


def _choice_result(task: Task, logprobs: list[float], lengths: list[int]) -> Result:
    assert task.params.constraint is not None
    choices = task.params.constraint["choices"]
    probs = constrain.choice_distribution(choices, logprobs)
    p = task.params
    choice = constrain.pick_choice(probs, p.temperature, f"{p.seed}:{task.id}:{task.sample_index}")
    return Result(
        key=task.key,
        text=choice,
        finish_reason="stop",
        prompt_tokens=len(task.prompt_ids),
        completion_tokens=lengths[choices.index(choice)],
        created=int(time.time()),
        extra={"parsed": choice, "choice_probs": probs},
    )
