"""BatchRun: one mlx-lm BatchGenerator over prefix groups of Tasks, driven until done or stopped.

Groups are fed in as the decoder has room, each group's shared prefix prefilled only then;
finished rows become Results (stop strings cut, logprobs attached). It does not choose batch
sizes or retry failures (model.py does).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mlxbatch.pipeline.engine.sampling import SeededSampler, row_processors
from mlxbatch.records import PrefixGroup, Result, Task

if TYPE_CHECKING:  # decode.py imports mlx, which this module leaves to its callers
    from mlxbatch.pipeline.engine.decode import StepResponses

# Test hook: any decode step with more rows than this fails as if out of memory.
INJECT_OOM_ENV = "MLXBATCH_INJECT_OOM_ROWS"


class BatchRun:
    """One BatchGenerator over a list of tasks; `drive` runs it until done or stopped."""

    def __init__(
        self,
        engine: Any,
        groups: list[PrefixGroup],
        completion: int,
        prefill: int,
        on_result: Callable[[Result], None],
        masks: Any = None,
    ):
        from mlx_lm.generate import BatchGenerator

        self.engine, self.on_result = engine, on_result
        self.limit = injected_oom_limit()
        self.done: set[str] = set()
        self.gen = BatchGenerator(
            engine.model,
            stop_tokens=[[e] for e in engine.eos_ids],
            completion_batch_size=completion,
            prefill_batch_size=prefill,
        )
        self.masks = masks
        self.sampler = SeededSampler()
        self.sampling = any(t.params.temperature > 0 for g in groups for t in g.tasks)
        self.queue = deque(groups)
        # Rows queued ahead of the decoder: enough to keep batches full, few enough that only a
        # handful of prefix caches are alive at once. One row at a time (a failing row being
        # found) takes the next row only when it is done: a failure is then the row in flight's.
        self.ahead = 2 * completion if completion > 1 else 1
        self.completion = completion
        self.prefixes: dict[int, list[Any]] = {}
        self.tasks: dict[int, Task] = {}
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[dict]] = {}
        self.stops: dict[int, _StopWatch] = {}
        self._feed()

    def _feed(self) -> None:
        """Insert groups while few rows wait. Prefixes are prefilled only now, together, and
        rows after a prefix here too, a decode batch at a time (Engine.prefill_rows)."""
        groups, waiting = [], len(self.tasks)
        while self.queue and waiting < self.ahead:
            group = self.queue.popleft()
            if group.prefix and len(group.tasks) > self.completion:
                rest = PrefixGroup(group.prefix, group.tasks[self.completion :])
                self.queue.appendleft(rest)
                group = PrefixGroup(group.prefix, group.tasks[: self.completion])
            groups.append(group)
            waiting += len(group.tasks)
        # A prefix cache serves every part of its group: keyed by the prefix list's identity.
        new = {id(g.prefix): g.prefix for g in groups if g.prefix}
        new = {k: prefix for k, prefix in new.items() if k not in self.prefixes}
        if new:
            prefilled = self.engine.prefill_prefixes(list(new.values()))
            self.prefixes.update(zip(new, prefilled, strict=True))
        for group in groups:
            n = len(group.prefix)
            prompts = [t.prompt_ids[n:] for t in group.tasks]
            caches, history = None, None
            if group.prefix:
                shared = self.prefixes[id(group.prefix)]
                history = [p[:-1] for p in prompts]
                caches = self.engine.prefill_rows(shared, history)
                if caches is None:
                    caches, history = [shared] * len(prompts), None
                else:
                    prompts = [p[-1:] for p in prompts]
            uids = self.gen.insert(
                prompts,
                max_tokens=[t.params.max_tokens for t in group.tasks],
                caches=caches or [self.engine.row_cache() for _ in group.tasks],
                # The prefilled tokens, for logits processors that look back (repetition).
                all_tokens=history,
                # One shared sampler once any row samples: mlx-lm then calls it once per step.
                samplers=[self.sampler if self.sampling else None] * len(group.tasks),
                logits_processors=[row_processors(t, self.masks) for t in group.tasks],
            )
            for uid, task in zip(uids, group.tasks, strict=True):
                self.sampler.register(uid, task)
                self.tasks[uid] = task
                self.tokens[uid] = []
                if task.params.logprobs:
                    self.logprobs[uid] = []
                if task.params.stop:
                    self.stops[uid] = _StopWatch(task.params.stop, self.engine.tokenizer)
        # Only the rest of a group cut at a decode batch still needs its prefix cache.
        needed = id(self.queue[0].prefix) if self.queue else None
        self.prefixes = {k: v for k, v in self.prefixes.items() if k == needed}

    def drive(self, should_stop: Callable[[], bool]) -> bool:
        while self.tasks or self.queue:
            if should_stop():
                return False
            self._feed()
            active = len(self.gen._generation_batch) if self.limit is not None else 0
            if self.limit is not None and active > self.limit:
                raise RuntimeError(f"[malloc] injected out of memory with {active} rows")
            step = self.gen.next_generated()
            if not step and not self.queue:
                raise RuntimeError(f"generation stalled with {len(self.tasks)} rows unfinished")
            if step:
                self._take(step)
        return True

    def _take(self, step: StepResponses) -> None:
        """One decode step's tokens. Most rows just get theirs; rows that finish, watch for
        stop strings or report logprobs go through `_advance`, in row order."""
        special = set(step.finished)
        if self.stops or self.logprobs:
            watched = self.stops.keys() | self.logprobs.keys()
            special.update(i for i, uid in enumerate(step.uids) if uid in watched)
        tokens = self.tokens
        for i, (uid, token) in enumerate(zip(step.uids, step.tokens, strict=True)):
            if i not in special and uid in tokens:
                tokens[uid].append(token)
        for i in sorted(special):
            r = step[i]
            if r.finish_reason != "stop" and r.uid in self.logprobs:
                entry = self._token_logprobs(r.uid, r.token, r.logprobs.value())
                self.logprobs[r.uid].append(entry)
            self._advance(r.uid, r.token, r.finish_reason)

    def _advance(self, uid: int, token: int, finish: str | None) -> None:
        if uid not in self.tasks:
            return
        if finish != "stop":  # "stop" here means an EOS token, which is not part of the text
            self.tokens[uid].append(token)
        watch = self.stops.get(uid)
        if finish is None and watch is not None and watch.hit(token):
            self.gen.remove([uid])
            finish = "stop"
        if finish is not None:
            self._finish(uid, finish)

    def _token_logprobs(self, uid: int, token: int, logprobs: Any) -> dict:
        """OpenAI's per-token logprob entry, with the row's top_logprobs alternatives."""
        import mlx.core as mx

        decode = self.engine.tokenizer.decode
        entry: dict[str, Any] = {"token": decode([token]), "logprob": logprobs[token].item()}
        k = self.tasks[uid].params.top_logprobs
        if k:
            top = mx.argpartition(-logprobs, k - 1)[:k]
            ids: list[int] = top.tolist()  # type: ignore[assignment]
            values: list[float] = logprobs[top].tolist()  # type: ignore[assignment]
            pairs = sorted(zip(ids, values, strict=True), key=lambda p: -p[1])
            entry["top_logprobs"] = [{"token": decode([t]), "logprob": v} for t, v in pairs]
        return entry

    def _finish(self, uid: int, finish: str) -> None:
        self.sampler.forget(uid)
        task = self.tasks.pop(uid)
        tokens = self.tokens.pop(uid)
        text = self.engine.tokenizer.decode(tokens)
        watch = self.stops.pop(uid, None)
        if watch is not None:
            cut = watch.cut(text)
            if cut is not None:
                text, finish = cut, "stop"
        stats = self.engine.stats
        stats.prompt_tokens += len(task.prompt_ids)
        stats.generated_tokens += len(tokens)
        self.done.add(task.key)
        logprobs = self.logprobs.pop(uid, None)
        self.on_result(
            Result(
                key=task.key,
                text=text,
                finish_reason=finish,
                prompt_tokens=len(task.prompt_ids),
                completion_tokens=len(tokens),
                created=int(time.time()),
                extra={"logprobs": {"content": logprobs}} if logprobs is not None else {},
            )
        )

    def close(self) -> None:
        self.gen.close()


class _StopWatch:
    """Finds stop strings in a row's streamed text."""

    def __init__(self, stops: tuple[str, ...], tokenizer: Any):
        self.stops = stops
        self.detok = tokenizer.detokenizer
        self.longest = max(len(s) for s in stops)
        self.checked = 0

    def hit(self, token: int) -> bool:
        self.detok.add_token(token)
        text = self.detok.text
        start = max(0, self.checked - self.longest)
        self.checked = len(text)
        return any(s in text[start:] for s in self.stops)

    def cut(self, text: str) -> str | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(found)] if found else None


def injected_oom_limit() -> int | None:
    value = os.environ.get(INJECT_OOM_ENV)
    return int(value) if value else None
