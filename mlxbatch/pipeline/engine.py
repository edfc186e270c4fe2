"""The only module that touches MLX: load a model, then generate Tasks with mlx-lm's BatchGenerator.

mlx and mlx_lm are imported inside functions, so `--help`, `validate` and `status` never pay
for them. Decoding is mlx-lm's continuous batching; this module adds what a batch job needs
around it: per-row seeded samplers whose draws do not depend on batch composition, stop
strings, and recovery from a failing step (out of memory) by halving the batch down to single
rows, where a row that still fails becomes an error record. Ordering and batch sizing are
decided by the caller (pipeline/plan.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxbatch.records import PrefixGroup, Result, Task

PREFILL_STEP = 2048
# Test hook: any decode step with more rows than this fails as if out of memory.
INJECT_OOM_ENV = "MLXBATCH_INJECT_OOM_ROWS"
# "grouped" or "mlx": decode attention of padded batches (default: grouped on CUDA only).
DECODE_ATTENTION_ENV = "MLXBATCH_DECODE_ATTENTION"


class ModelLoadError(RuntimeError):
    """The model could not be loaded (missing, offline, unsupported)."""


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_tokens: int = 0  # prompt tokens prefilled once for a whole prefix group
    peak_memory: int = 0


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


class Engine:
    """A loaded model and tokenizer, ready to generate batches of Tasks."""

    def __init__(
        self,
        model: str,
        *,
        adapter_path: str | None = None,
        dtype: str = "auto",
        quantize: int | None = None,
        trust_remote_code: bool = False,
    ):
        import mlx.core as mx
        from mlx_lm.utils import load

        self.model_name = model
        try:
            self.model, self.tokenizer, self.config = load(
                model,
                adapter_path=adapter_path,
                return_config=True,
                tokenizer_config={"trust_remote_code": trust_remote_code},
                trust_remote_code=trust_remote_code,
            )
        except Exception as e:  # hub, file-system and format errors all surface here
            raise ModelLoadError(_load_hint(model, e)) from None
        self.dtype = self._apply_dtype(dtype, mx)
        if quantize:
            self._quantize(quantize)
        self.identity = _model_identity(model, adapter_path, self.dtype, self.config)
        self.eos_ids = sorted(self.tokenizer.eos_token_ids)
        self.stats = EngineStats()

    def _apply_dtype(self, dtype: str, mx: Any) -> str:
        from mlx.utils import tree_flatten

        if dtype == "auto" and mx.default_device() == mx.cpu:
            dtype = "float32"  # bfloat16/float16 matmul is many times slower than float32 on CPU
        if dtype != "auto":
            self.model.set_dtype(getattr(mx, dtype))
        params = tree_flatten(self.model.parameters())
        floats = [v.dtype for _, v in params if mx.issubdtype(v.dtype, mx.floating)]
        return _dtype_name(floats[0]) if floats else "unknown"

    def _quantize(self, bits: int) -> None:
        from mlx_lm.utils import quantize_model

        if "quantization" in self.config:
            raise ModelLoadError(f"{self.model_name} is already quantized; drop --quantize")
        # In memory only: the original weights on disk stay as they are.
        self.model, self.config = quantize_model(self.model, self.config, 64, bits)

    @property
    def context_length(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return int(value) if value else None

    @property
    def prefill_tokens_per_step(self) -> int:
        """Prompt tokens to prefill together. On CPU, batching long prompts was measured
        slower than one at a time, while short suffixes after a shared prefix gain from it."""
        import mlx.core as mx

        if mx.default_device() == mx.cpu:
            return 512
        # On GPU, 32k tokens a step was best on an H100 (prefill 64 x ~600 tokens); activations
        # take roughly 64 bytes per hidden unit per token, so a small memory budget lowers it.
        per_token = 64 * int(self.config.get("hidden_size", 4096))
        return max(2048, min(32768, self.memory_budget() // per_token))

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.config
        layers = c.get("num_hidden_layers", 24)
        heads = c.get("num_attention_heads", 16)
        kv_heads = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or c.get("hidden_size", 1024) // heads
        itemsize = 4 if self.dtype == "float32" else 2
        return 2 * layers * kv_heads * head_dim * itemsize

    @functools.cached_property
    def _weights_bytes(self) -> int:
        from mlx.utils import tree_flatten

        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def memory_budget(self) -> int:
        """Bytes the KV caches may use: a share of device memory left after the weights."""
        import mlx.core as mx

        info = mx.device_info()
        total = (
            info.get("max_recommended_working_set_size")
            or info.get("memory_size")
            or info.get("total_memory")
            or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )
        return max(64 << 20, int(0.6 * int(total)) - self._weights_bytes)

    def generate(
        self,
        groups: list[PrefixGroup],
        *,
        completion_batch_size: int,
        prefill_batch_size: int,
        on_result: Callable[[Result], None],
        should_stop: Callable[[], bool] = lambda: False,
        masks: Any = None,
    ) -> bool:
        """Generate every task, calling `on_result` as each finishes, in finishing order.

        `masks` (pipeline/constrain.TokenMasks) turns a task's constraint into a per-step
        allowed-token mask; it is required when any task is constrained.

        Each group's shared prefix is prefilled once and its KV cache handed to every row of
        the group (mlx-lm merges caches without changing them, so no per-row copy is made).
        A failing step halves the batch and retries the unfinished tasks; at one row, the
        row in flight becomes an error record. Returns False if `should_stop` cut it short.
        """
        import mlx.core as mx

        size = completion_batch_size
        while groups := [g for g in groups if g.tasks]:
            run = None
            try:
                run = _BatchRun(self, groups, size, min(prefill_batch_size, size), on_result, masks)
                with _decode_attention(self.model):
                    return run.drive(should_stop)
            except (RuntimeError, MemoryError, ValueError) as e:
                mx.clear_cache()
                done = run.done if run else set()
                groups = [
                    PrefixGroup(g.prefix, [t for t in g.tasks if t.key not in done]) for g in groups
                ]
                if size > 1:
                    size = max(1, size // 2)
                    continue
                # One row at a time runs in insertion order: the first unfinished row failed.
                first = next(g for g in groups if g.tasks)
                on_result(
                    _error_result(
                        first.tasks.pop(0),
                        "out_of_memory" if _is_oom(e) else "generation_error",
                        str(e),
                    )
                )
            finally:
                if run is not None:
                    run.close()
                self.stats.peak_memory = max(self.stats.peak_memory, mx.get_peak_memory())
        return True

    def score_choices(
        self,
        groups: list[PrefixGroup],
        on_scores: Callable[[Task, list[float], list[int]], None],
        on_error: Callable[[Result], None],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Log-probability of each of a task's choices (then end of text) after its prompt.

        `on_scores(task, logprobs, choice_lengths)` is called per task (`on_error` with an
        error record for a task that fails, e.g. out of memory). The prompt is
        prefilled once per task (once per group for a shared prefix) and all choices are
        scored in one batched forward pass. Returns False if `should_stop` cut it short.
        """
        import mlx.core as mx

        eos = self.eos_ids[0] if self.eos_ids else None
        for group in groups:
            prefix = self.prefill_prefix(group.prefix) if group.prefix else None
            for task in group.tasks:
                if should_stop():
                    return False
                choices = (task.params.constraint or {})["choices"]
                seqs = [list(self.tokenizer.encode(c, add_special_tokens=False)) for c in choices]
                ends = [seq + ([eos] if eos is not None else []) for seq in seqs]
                try:
                    scores = self._score(task.prompt_ids, group.prefix, prefix, ends)
                except (RuntimeError, MemoryError, ValueError) as e:
                    mx.clear_cache()
                    code = "out_of_memory" if _is_oom(e) else "generation_error"
                    on_error(_error_result(task, code, str(e)))
                    continue
                self.stats.prompt_tokens += len(task.prompt_ids)
                on_scores(task, scores, [len(s) for s in seqs])
        return True

    def _score(
        self, prompt: list[int], prefix: list[int], prefix_cache: Any, seqs: list[list[int]]
    ) -> list[float]:
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        cache = make_prompt_cache(self.model)
        if not all(type(c) is KVCache for c in cache):
            raise ValueError("choices need a model with a plain KV cache")
        start = 0
        if prefix_cache is not None:
            for c, p in zip(cache, prefix_cache, strict=True):
                c.state = (p.keys[..., : p.offset, :], p.values[..., : p.offset, :], p.offset)
            start = len(prefix)
        rest = mx.array(prompt[start:-1])[None]
        for i in range(0, rest.shape[1], PREFILL_STEP):
            self.model(rest[:, i : i + PREFILL_STEP], cache=cache)
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
        logits = self.model(mx.array(rows), cache=batch).astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array([s + [0] * (width - len(s)) for s in seqs])[..., None]
        picked = mx.take_along_axis(logprobs[:, :width, :], targets, axis=-1)[..., 0]
        valid = mx.array([[1.0] * len(s) + [0.0] * (width - len(s)) for s in seqs])
        scores: list[float] = (picked * valid).sum(axis=1).tolist()  # type: ignore[assignment]
        return scores

    def prefill_prefix(self, prefix: list[int]) -> list[Any]:
        """A KV cache holding `prefix`, computed once for every row that starts with it."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        ids = mx.array(prefix)[None]
        for start in range(0, len(prefix), PREFILL_STEP):
            self.model(ids[:, start : start + PREFILL_STEP], cache=cache)
            mx.eval([c.state for c in cache])
        self.stats.prefix_tokens += len(prefix)
        return cache


class _BatchRun:
    """One BatchGenerator over a list of tasks; `drive` runs it until done or stopped."""

    def __init__(
        self,
        engine: Engine,
        groups: list[PrefixGroup],
        completion: int,
        prefill: int,
        on_result: Callable[[Result], None],
        masks: Any = None,
    ):
        from mlx_lm.generate import BatchGenerator

        self.engine, self.on_result = engine, on_result
        self.limit = _injected_oom_limit()
        self.done: set[str] = set()
        self.gen = BatchGenerator(
            engine.model,
            stop_tokens=[[e] for e in engine.eos_ids],
            completion_batch_size=completion,
            prefill_batch_size=prefill,
        )
        self.masks = masks
        self.sampler = _SeededSampler()
        self.sampling = any(t.params.temperature > 0 for g in groups for t in g.tasks)
        self.queue = deque(groups)
        # Rows queued ahead of the decoder: enough to keep batches full, few enough that only a
        # handful of prefix caches are alive at once.
        self.ahead = 2 * completion
        self.tasks: dict[int, Task] = {}
        self.tokens: dict[int, list[int]] = {}
        self.logprobs: dict[int, list[dict]] = {}
        self.stops: dict[int, _StopWatch] = {}
        self._feed()

    def _feed(self) -> None:
        """Insert whole groups while few rows wait; a group's prefix is prefilled only now."""
        while self.queue and len(self.tasks) < self.ahead:
            group = self.queue.popleft()
            cache = self.engine.prefill_prefix(group.prefix) if group.prefix else None
            uids = self.gen.insert(
                [t.prompt_ids[len(group.prefix) :] for t in group.tasks],
                max_tokens=[t.params.max_tokens for t in group.tasks],
                caches=[cache] * len(group.tasks),
                # One shared sampler once any row samples: mlx-lm then calls it once per step.
                samplers=[self.sampler if self.sampling else None] * len(group.tasks),
                logits_processors=[_processors(t, self.masks) for t in group.tasks],
            )
            for uid, task in zip(uids, group.tasks, strict=True):
                self.sampler.register(uid, task)
                self.tasks[uid] = task
                self.tokens[uid] = []
                if task.params.logprobs:
                    self.logprobs[uid] = []
                if task.params.stop:
                    self.stops[uid] = _StopWatch(task.params.stop, self.engine.tokenizer)

    def drive(self, should_stop: Callable[[], bool]) -> bool:
        while self.tasks or self.queue:
            if should_stop():
                return False
            self._feed()
            active = len(self.gen._generation_batch) if self.limit is not None else 0
            if self.limit is not None and active > self.limit:
                raise RuntimeError(f"[malloc] injected out of memory with {active} rows")
            responses = self.gen.next_generated()
            if not responses and not self.queue:
                raise RuntimeError(f"generation stalled with {len(self.tasks)} rows unfinished")
            for r in responses:
                if r.finish_reason != "stop" and r.uid in self.logprobs:
                    self.logprobs[r.uid].append(self._token_logprobs(r.uid, r.token, r.logprobs))
                self._advance(r.uid, r.token, r.finish_reason)
        return True

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


class UnsupportedMlxLm(ModelLoadError):
    """mlx-lm no longer calls samplers the way this module expects (see _calling_batch)."""


def _calling_batch_uids(rows: int) -> list[int]:
    """The uids, in row order, of the mlx-lm GenerationBatch whose step called the sampler.

    mlx-lm hands a sampler only the batch's logprobs. The alternative, a logits processor per
    row that announces the row, makes mlx-lm slice the batch row by row every step.
    """
    import sys

    caller = sys._getframe(2).f_locals.get("self")  # 0: here, 1: the sampler, 2: its caller
    uids = getattr(caller, "uids", None)
    if not isinstance(uids, list) or len(uids) != rows:
        raise UnsupportedMlxLm("this mlx-lm version calls samplers differently; pin mlx-lm<0.33")
    return uids


class _SeededSampler:
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

        rows = [self.rows.get(uid) for uid in _calling_batch_uids(logprobs.shape[0])]
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


def _processors(task: Task, masks: Any) -> list[Callable]:
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


@contextlib.contextmanager
def _decode_attention(model: Any) -> Any:
    """Route the model's attention through `_grouped_decode_attention` while generating.

    mlx-lm model modules call `scaled_dot_product_attention` by module-global name, so it is
    swapped there, and put back afterwards. On by default on CUDA only, where it was measured.
    """
    import mlx.core as mx
    from mlx_lm.models import base

    choice = os.environ.get(DECODE_ATTENTION_ENV) or ("grouped" if mx.cuda.is_available() else "")
    original = base.scaled_dot_product_attention
    modules: set[Any] = {sys.modules[type(m).__module__] for m in model.modules()}
    swapped = [m for m in modules if getattr(m, "scaled_dot_product_attention", None) is original]
    if choice == "grouped":
        for module in swapped:
            module.scaled_dot_product_attention = _grouped_decode_attention
    try:
        yield
    finally:
        for module in swapped:
            module.scaled_dot_product_attention = original


def _grouped_decode_attention(
    queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any, sinks: Any = None
) -> Any:
    """Attention of one decode step in a left-padded batch, as two grouped matmuls.

    The padding needs an array mask, and with one MLX's CUDA backend leaves its fused decode
    kernel for a generic path: 36 ms per decode step vs 12 ms this way (H100, 512 rows, 24
    layers). The query heads sharing a KV head become the rows of one matmul, so each KV head
    is read once per row. The arithmetic is MLX's own masked path (scores in the input dtype,
    a precise softmax); prefill chunks (no faster this way, measured) and anything else go to
    mlx-lm's attention.
    """
    import mlx.core as mx
    from mlx_lm.models import base

    b, heads, n, dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = (
        n == 1
        and sinks is None
        and isinstance(mask, mx.array)
        and mask.ndim == 4
        and mask.shape[1] == 1
        and heads % kv_heads == 0
        and not hasattr(cache, "bits")  # quantized caches have their own attention
    )
    if not grouped:
        return base.scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks
        )
    group = heads // kv_heads
    q = (queries * mx.array(scale, queries.dtype)).reshape(b, kv_heads, group * n, dim)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(b, kv_heads, group, n, -1)
    row_mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[2], mask.shape[3])
    if row_mask.dtype == mx.bool_:
        lowest = mx.array(mx.finfo(scores.dtype).min, scores.dtype)
        scores = mx.where(row_mask, scores, lowest)
    else:
        scores = scores + row_mask.astype(scores.dtype)
    weights = mx.softmax(scores, axis=-1, precise=True).reshape(b, kv_heads, group * n, -1)
    return (weights @ values).reshape(b, heads, n, values.shape[-1])


def _injected_oom_limit() -> int | None:
    value = os.environ.get(INJECT_OOM_ENV)
    return int(value) if value else None


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "memory" in text or "alloc" in text


def _error_result(task: Task, code: str, message: str) -> Result:
    return Result(
        key=task.key,
        finish_reason="error",
        prompt_tokens=len(task.prompt_ids),
        error_code=code,
        error_message=message,
        created=int(time.time()),
    )


def _model_identity(model: str, adapter: str | None, dtype: str, config: dict) -> str:
    """Model name, config, weight files and adapter: what makes outputs of this model."""
    parts: list[Any] = [model, dtype, json.dumps(config, sort_keys=True, default=str)]
    path = Path(model)
    if path.is_dir():
        parts += sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    if adapter:
        for p in sorted(Path(adapter).glob("*")):
            if p.is_file():
                parts.append((p.name, hashlib.sha256(p.read_bytes()).hexdigest()))
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _load_hint(model: str, e: Exception) -> str:
    name = type(e).__name__
    if not Path(model).exists() and ("/" in model):
        return (
            f"could not load model {model!r} ({name}: {e}). If this machine is offline, "
            "download it first or pass a local model directory to --model."
        )
    return f"could not load model {model!r} ({name}: {e})"


def describe_runtime() -> dict[str, Any]:
    """What `mlxbatch doctor` reports: versions, device, and which BLAS MLX runs on."""
    import platform
    from importlib.metadata import version

    import mlx.core as mx

    mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))  # loads the BLAS library
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": version("mlx"),
        "mlx-lm": version("mlx-lm"),
        "device": str(mx.default_device()),
        "device_info": mx.device_info(),
    }
    maps = Path("/proc/self/maps")
    if maps.exists():
        libs = {line.split()[-1] for line in maps.read_text().splitlines() if "blas" in line}
        report["blas"] = sorted(libs)
        report["openblas"] = any("openblas" in lib for lib in libs)
    try:
        report["llguidance"] = version("llguidance")
    except Exception:
        report["llguidance"] = None
    return report
