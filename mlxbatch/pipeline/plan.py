"""Order tasks and size batches: sort by prompt length, choose batch sizes from a memory budget.

Sorting puts prompts of similar length in the same prefill batch, so little compute goes to
padding (measured 2.2x on an H100 over file order). Batch sizes come from the KV cache bytes
each row will need against the memory left after the weights, not from fixed defaults.
Nothing here touches the model or the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

from mlxbatch.records import PrefixGroup, Task

# Most rows decoded together unless the engine says otherwise (Engine.max_completion_batch).
MAX_COMPLETION_BATCH = 512
PREFILL_TOKENS_PER_STEP = 8192


@dataclass(frozen=True)
class BatchSizes:
    completion: int  # rows decoded together
    prefill: int  # rows prefilled together


def sort_by_length(tasks: Iterable[Task]) -> list[Task]:
    """Tasks by prompt length, then output order, so equal lengths keep a stable order."""
    return sorted(tasks, key=lambda t: (len(t.prompt_ids), t.seq))


def context_error(task: Task, context_length: int | None) -> tuple[str, str] | None:
    """Why a task cannot run in the model's context, or None when it fits."""
    n_prompt = len(task.prompt_ids)
    if n_prompt == 0:
        return ("empty_prompt", "the prompt is empty after tokenization")
    if context_length is None:
        return None
    if n_prompt >= context_length:
        return (
            "context_length_exceeded",
            f"prompt is {n_prompt} tokens; the model's context is {context_length}",
        )
    if n_prompt + task.params.max_tokens > context_length:
        return (
            "max_tokens_too_large",
            f"prompt ({n_prompt} tokens) + max_tokens ({task.params.max_tokens}) exceeds "
            f"the model's context of {context_length}",
        )
    return None


def choose_batch_sizes(
    tasks: list[Task],
    *,
    kv_bytes_per_token: int,
    memory_budget: int,
    cap: int | None = None,
    prefill_tokens: int = PREFILL_TOKENS_PER_STEP,
    prefilled: list[int] | None = None,
    most: int = MAX_COMPLETION_BATCH,
    held_once: int = 0,
) -> BatchSizes:
    """Largest batches whose KV caches fit `memory_budget`, at most `most` rows (the device's
    limit) and `cap` when given (the user's).

    `held_once`: prompt tokens every task starts with that each batch holds once, not once
    per row (a prefix shared by the whole job, cache.py). Prefill batches hold about
    `prefill_tokens` tokens of what is actually prefilled per row (`prefilled`: prompt tokens
    after a shared prefix; by default the whole prompt).
    """
    if not tasks:
        return BatchSizes(1, 1)
    own = sum(len(t.prompt_ids) - held_once + t.params.max_tokens for t in tasks) / len(tasks)
    per_row = max(1, int(own * kv_bytes_per_token))
    rows_memory = memory_budget - held_once * kv_bytes_per_token
    completion = max(1, min(most, rows_memory // per_row))
    if cap is not None:
        completion = min(completion, cap)
    lengths = prefilled if prefilled is not None else [len(t.prompt_ids) for t in tasks]
    mean_prefill = sum(lengths) / max(1, len(lengths))
    prefill = max(1, min(completion, int(prefill_tokens // max(1.0, mean_prefill))))
    return BatchSizes(completion=completion, prefill=prefill)


def _common_length(a: list[int], b: list[int], lo: int = 0) -> int:
    """Length of the longest common prefix of `a` and `b`, known to be at least `lo`."""
    # Binary search over slice comparisons, which run in C: a Python loop over every shared
    # token took ~0.1 s for 512 prompts behind a 1,500-token system prompt.
    hi = min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def group_by_prefix(tasks: list[Task], *, min_prefix: int = 16) -> list[PrefixGroup]:
    """Group tasks so that each group's shared prefix saves the most prefill tokens.

    Prompts are sorted as token sequences, so rows sharing a prefix are adjacent. A run of rows
    is kept as one group when (rows - 1) * shared length beats splitting it into sub-runs with
    longer shared prefixes (a system prompt shared by all vs. n samples of one prompt). Every
    prefix leaves at least one token of each prompt to prefill. Rows sharing nothing useful come
    back in a group with an empty prefix.
    """
    # What every prompt shares (what the smallest and largest share) stays out of the sort
    # keys and the searches: 512 prompts behind 1,551 shared ids, 10 -> 5 ms (2-core CPU).
    ids = [t.prompt_ids for t in tasks]
    common = _common_length(min(ids), max(ids)) if ids else 0
    ordered = sorted(tasks, key=lambda t: t.prompt_ids[common:])
    shared = [_common_length(a.prompt_ids, b.prompt_ids, common) for a, b in pairwise(ordered)]
    lengths = [len(t.prompt_ids) for t in ordered]
    groups: list[PrefixGroup] = []
    loose: list[Task] = []

    def split(lo: int, hi: int, depth: int) -> tuple[int, list[tuple[int, int, int]]]:
        # Best (saved tokens, [(lo, hi, prefix length)]) for rows lo..hi inclusive.
        if lo == hi:
            return 0, [(lo, hi, 0)]
        floor = min(shared[lo:hi])
        floor = min(floor, min(lengths[lo : hi + 1]) - 1)
        whole = (hi - lo) * floor if floor >= min_prefix else 0
        if depth > 64:
            return whole, [(lo, hi, floor if whole else 0)]
        parts, saved, start = [], 0, lo
        for i in range(lo, hi + 1):
            if i == hi or shared[i] <= floor:
                part_saved, part = split(start, i, depth + 1) if i > start else (0, [(i, i, 0)])
                saved += part_saved
                parts += part
                start = i + 1
        if whole >= saved:
            return whole, [(lo, hi, floor if whole else 0)]
        return saved, parts

    if ordered:
        for lo, hi, length in split(0, len(ordered) - 1, 0)[1]:
            members = ordered[lo : hi + 1]
            if length >= min_prefix and len(members) > 1:
                prefix = list(members[0].prompt_ids[:length])
                groups.append(PrefixGroup(prefix, sort_by_length(members)))
            else:
                loose += members
    if loose:
        groups.append(PrefixGroup([], sort_by_length(loose)))
    return groups
