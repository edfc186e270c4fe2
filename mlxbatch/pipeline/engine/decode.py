"""mlx-lm's decode step, less its per-row split of the log-probabilities and of the caches.

`GenerationBatch._step` turns each step's [rows, vocab] log-probabilities into one array per
row (`list(logprobs)`) and evaluates them all: ~5 ms of a 23 ms step on an H100 with 512 rows,
paid whether or not any row asks for logprobs. `RowLogprobsBatch` keeps the one array and
hands each row a `RowLogprobs` (the array and the row's index), sliced only by the rows that
report logprobs (batch.py). Its `next` gives the step back whole (`StepResponses`): mlx-lm's
per-row Response objects are made only for rows that finish, or when read one by one.
Likewise a finished row's cache is one `LaterRow` handle, cut out of the batch's layers only
when read, not one handle per layer (12,288 when 512 rows of 24 layers finish together;
batch.py reads none). Everything else is mlx-lm's step, line for line. `HandOverBatch` hands
a prompt batch whose rows all move on to decoding over as it is: mlx-lm's split deep-copies
every layer's keys and values, then empties the batch. Both are swapped in by module-global
name while a run generates, like attention.py, and pinned by mlx-lm<0.33.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import mlx.core as mx

from mlxbatch.pipeline.engine.cache import RowBatchKVCache

# The module, not mlx_lm's `generate` function of the same name.
generate: Any = importlib.import_module("mlx_lm.generate")
GenerationBatch: Any = generate.GenerationBatch
PromptProcessingBatch: Any = generate.PromptProcessingBatch


class RowLogprobs(NamedTuple):
    """One row of a step's log-probabilities: `batch[row]`, not sliced until `value()`."""

    batch: Any
    row: int

    def value(self) -> Any:
        return self.batch[self.row]


@contextlib.contextmanager
def batch_classes() -> Iterator[None]:
    """While the block runs, mlx-lm's BatchGenerator makes RowLogprobsBatches to decode and
    HandOverBatches to prefill."""
    generate.GenerationBatch = RowLogprobsBatch
    generate.PromptProcessingBatch = HandOverBatch
    try:
        yield
    finally:
        generate.GenerationBatch = GenerationBatch
        generate.PromptProcessingBatch = PromptProcessingBatch


class HandOverBatch(PromptProcessingBatch):
    """A PromptProcessingBatch that hands itself over, caches and all, when every row moves
    on to decoding; mlx-lm's split copies each layer (~1 GB for 512 labelling rows) first."""

    uids: list[int]
    prompt_cache: list[Any]

    def split(self, indices: list[int]) -> Any:
        if sorted(indices) != list(range(len(self.uids))):
            return super().split(indices)
        moved = copy.copy(self)
        self.prompt_cache = []  # mlx-lm's filter empties the list in place: not moved's
        self.filter([])
        moved.filter(sorted(indices))
        return moved


class RowLogprobsBatch(GenerationBatch):
    """A GenerationBatch whose rows' logprobs are RowLogprobs of one array per step."""

    # Set by GenerationBatch; declared for the type checker, which cannot see into mlx-lm.
    _current_tokens: Any
    _next_tokens: Any
    _next_logprobs: list[RowLogprobs]
    _num_tokens: list[int]
    _matchers: list[Any]
    prompt_cache: list[Any]
    _cutters: list[Callable[[int], Any]] | None = None  # the layers as they are now

    def extract_cache(self, idx: int) -> Any:
        """Row `idx`'s per-layer cache as one handle, cut out of the layers when first read."""
        if self._cutters is None:  # once per batch state, not once per finished row
            ours = all(isinstance(c, RowBatchKVCache) for c in self.prompt_cache)
            self._cutters = [c.cutter() for c in self.prompt_cache] if ours else []
        if not self._cutters:
            return super().extract_cache(idx)
        return LaterRow(self._cutters, idx)

    # Each of these changes the layers, so rows are cut from them afresh afterwards.
    def filter(self, keep: list[int]) -> None:
        self._cutters = None
        super().filter(keep)

    def extend(self, batch: Any) -> None:
        self._cutters = None
        super().extend(batch)

    def next(self) -> Any:
        """mlx-lm's `next`: count each row's tokens, advance its stop matcher, cut out the rows
        that finish. Its per-row loop (a Response per row and step; with the stop matchers ~2 ms
        of a 512-row step under a profiler, H200 host) is cut to what a step needs."""
        if not self.uids:
            return []
        tokens, logprobs = self._step()
        self._num_tokens = counts = [n + 1 for n in self._num_tokens]
        stopped = [m.advance(t) for m, t in zip(self._matchers, tokens, strict=True)]
        ended = [
            i
            for i, (n, cap, stop) in enumerate(zip(counts, self.max_tokens, stopped, strict=True))
            if stop or n >= cap
        ]
        finished = {
            i: self.Response(
                uid=self.uids[i],
                token=tokens[i],
                logprobs=logprobs[i],
                finish_reason="stop" if stopped[i] else "length",
                prompt_cache=self.extract_cache(i),
                all_tokens=self.tokens[i],
            )
            for i in ended
        }
        # uids copied: mlx-lm extends the batch's list in place before the step is read.
        step = StepResponses(self.Response, list(self.uids), tokens, logprobs, finished)
        if ended:
            gone = set(ended)
            self.filter([i for i in range(len(self.uids)) if i not in gone])
        return step

    def _step(self) -> tuple[list[int], list[Any]]:
        self._cutters = None
        # When the tokens handed back now end every row at its max_tokens, the step after them
        # (mlx-lm always computes it) would only be thrown away.
        last = self._current_tokens is not None and all(
            n + 1 >= m for n, m in zip(self._num_tokens, self.max_tokens, strict=True)
        )
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        inputs = self._current_tokens
        if last:
            self._next_tokens, self._next_logprobs = None, []
        else:
            self._next_tokens, logprobs, token_context = self._forward(inputs)
            # The one change: rows get (array, index) handles instead of B evaluated slices.
            self._next_logprobs = [RowLogprobs(logprobs, i) for i in range(logprobs.shape[0])]
            mx.async_eval(self._next_tokens, logprobs, token_context)

        mx.eval(inputs, _arrays(self._current_logprobs))
        inputs = inputs.tolist()
        for sti, ti in zip(self.tokens, inputs, strict=True):
            sti.append(ti)
        return inputs, self._current_logprobs

    def _forward(self, inputs: Any) -> tuple[Any, Any, list[Any]]:
        """mlx-lm's forward pass, logits processors and sampling, line for line."""
        logits = self.model(inputs[:, None], cache=self.prompt_cache)
        logits = logits[:, -1, :]

        token_context = []
        if any(self.logits_processors):
            processed_logits = []
            for e in range(len(self.uids)):
                sample_logits = logits[e : e + 1]
                processors = self.logits_processors[e] or ()
                if processors:
                    context = self._token_context[e].update_and_fetch(inputs[e : e + 1])
                    token_context.append(context)
                    for processor in processors:
                        sample_logits = processor(context, sample_logits)
                processed_logits.append(sample_logits)
            logits = mx.concatenate(processed_logits, axis=0)

        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        samplers = [
            self.fallback_sampler if s is None else s
            for s in (self.samplers or [None] * len(self.uids))
        ]
        if not samplers or all(s is samplers[0] for s in samplers):
            sampled = (samplers[0] if samplers else self.fallback_sampler)(logprobs)
        else:
            sampled = mx.concatenate(
                [s(logprobs[e : e + 1]) for e, s in enumerate(samplers)], axis=0
            )
        return sampled, logprobs, token_context


class StepResponses(Sequence):
    """A decode step's rows as mlx-lm's list of Responses, each made when read; BatchRun reads
    `uids`, `tokens` and `finished` (row index -> Response) instead."""

    def __init__(
        self,
        response: Callable[..., Any],
        uids: list[int],
        tokens: list[int],
        logprobs: list[RowLogprobs],
        finished: dict[int, Any],
    ):
        self._response = response
        self.uids, self.tokens, self.logprobs, self.finished = uids, tokens, logprobs, finished

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i in self.finished:
            return self.finished[i]
        return self._response(
            uid=self.uids[i],
            token=self.tokens[i],
            logprobs=self.logprobs[i],
            finish_reason=None,
            prompt_cache=None,
            all_tokens=None,
        )


class LaterRow(Sequence):
    """A finished row's per-layer cache, cut out of the batch the first time it is read."""

    def __init__(self, cutters: list[Callable[[int], Any]], row: int):
        self._cutters, self._row = cutters, row
        self._layers: list[Any] | None = None

    def __getitem__(self, i: Any) -> Any:
        if self._layers is None:
            self._layers = [cut(self._row) for cut in self._cutters]
        return self._layers[i]

    def __len__(self) -> int:
        return len(self._cutters)


def _arrays(rows: list[RowLogprobs]) -> list[Any]:
    """The distinct arrays behind a list of rows (batches merge and filter rows' handles)."""
    return list({id(r.batch): r.batch for r in rows}.values())
