"""Engine: a loaded model and tokenizer; generates and scores Tasks.

Loading (dtype, in-memory quantization, the model's identity for result keys), the memory
budget that batch sizes come from, and `generate`, which runs BatchRuns and halves the batch
on a failing step. Decoding itself is in batch.py, prefix prefill in prefix.py, choice
scoring in score.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxbatch.pipeline.engine.attention import batch_attention, on_cuda
from mlxbatch.pipeline.engine.batch import BatchRun
from mlxbatch.pipeline.engine.errors import (
    ModelLoadError,
    StepFailures,
    UnsupportedMlxLm,
    error_result,
    is_oom,
    load_failed,
)
from mlxbatch.records import PrefixGroup, Result, Task

# Most prompt tokens prefilled in one pass on a GPU (prefill_tokens_per_step). On an H200,
# 16,384 made the mixed workload 1.46x slower (benchmarks.ab, 2026-12-02-h200/).
MAX_PREFILL_TOKENS = 98304
# Most rows decoded together on CUDA; other devices keep plan.MAX_COMPLETION_BATCH (512: on the
# 2-core CPU, 1,024 was 0.93x as fast and 256 0.99x; cpu-labelling-decode-batch-2026-12-02g.txt).
# On an H200 (4,096 rows, benchmarks.ab): mixed 14.8 / 12.2 / 10.4 / 9.8 s at 512 / 1,024 /
# 2,048 / 4,096 rows, peak 35 / 37 / 54 / 60 GiB; labelling 3.04 / - / 2.63 / 2.59 s. The last
# doubling gave 7% for 12% more memory, and the budget (which counts only the KV cache) is not
# raised.
MAX_CUDA_COMPLETION_BATCH = 2048


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_tokens: int = 0  # prompt tokens prefilled once for a whole prefix group
    peak_memory: int = 0


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
        from mlx_lm.utils import _download, load_config

        from mlxbatch.pipeline.engine.load import WeightsLoader
        from mlxbatch.pipeline.engine.tokenizer import load_tokenizer

        self.model_name = model
        try:
            path = _download(model)
            # The weights load on a worker thread while the tokenizer loads and prompts render.
            self._weights = WeightsLoader(
                path,
                name=model,
                adapter_path=adapter_path,
                dtype=dtype,
                quantize=quantize,
                trust_remote_code=trust_remote_code,
            )
            try:
                self.tokenizer = load_tokenizer(
                    path,
                    {"trust_remote_code": trust_remote_code},
                    eos_token_ids=load_config(path).get("eos_token_id"),
                )
            finally:
                # The worker builds the model meanwhile. A failed build says more about a
                # broken model directory than a tokenizer error does, so it is raised first.
                self._weights.wait_built()
        except ModelLoadError:
            raise
        except Exception as e:  # hub, file-system and format errors all surface here
            raise load_failed(model, e) from None
        self.config = self._weights.config
        self.dtype = self._weights.dtype
        self.identity = _model_identity(model, adapter_path, self.dtype, self.config)
        self.eos_ids = sorted(self.tokenizer.eos_token_ids)
        self.stats = EngineStats()

    @functools.cached_property
    def model(self) -> Any:
        """The model, waiting for its weights to finish loading the first time."""
        try:
            return self._weights.model()
        except ModelLoadError:
            raise
        except Exception as e:
            raise load_failed(self.model_name, e) from None

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
        # On an H100, with fused causal attention for prefill steps, ~96k tokens a step beat
        # 32k: labelling 512 x ~190 tokens after a shared prefix, mixed 256-row batches of
        # ~300. Peak memory grew ~170 bytes per hidden unit per token, so a small memory
        # budget lowers it.
        per_token = 192 * int(self.config.get("hidden_size", 4096))
        return max(2048, min(MAX_PREFILL_TOKENS, self.memory_budget() // per_token))

    @functools.cached_property
    def max_completion_batch(self) -> int:
        """Most rows decoded together, before the memory budget and --batch-size."""
        from mlxbatch.pipeline.plan import MAX_COMPLETION_BATCH

        return MAX_CUDA_COMPLETION_BATCH if on_cuda() else MAX_COMPLETION_BATCH

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
        return max(64 << 20, int(0.6 * self._device_memory) - self._weights_bytes)

    @functools.cached_property
    def _device_memory(self) -> int:
        # Read once: the budget is asked for at every prefix group (0.3 ms a read on CUDA).
        import mlx.core as mx

        info = mx.device_info()
        return int(
            info.get("max_recommended_working_set_size")
            or info.get("memory_size")
            or info.get("total_memory")
            or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )

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
        the group (held once per batch where the model allows it, see cache.py).
        A failing step halves the batch and retries the unfinished tasks; at one row, the
        row in flight becomes an error record (errors.StepFailures sets the batch size after
        it, and raises EngineBroken when every row fails alike).
        Returns False if `should_stop` cut it short.
        """
        import mlx.core as mx

        from mlxbatch.pipeline.engine.decode import batch_classes

        failures = StepFailures(completion_batch_size)
        while groups := [g for g in groups if g.tasks]:
            run, size = None, failures.size
            try:
                with batch_classes():
                    run = BatchRun(
                        self, groups, size, min(prefill_batch_size, size), on_result, masks
                    )
                    with batch_attention(self.model):
                        return run.drive(should_stop)
            except UnsupportedMlxLm:
                raise  # not a failing step: retrying smaller batches would not help
            except (RuntimeError, MemoryError, ValueError) as e:
                mx.clear_cache()
                done = run.done if run else set()
                groups = [
                    PrefixGroup(g.prefix, [t for t in g.tasks if t.key not in done]) for g in groups
                ]
                if done:
                    failures.finished()
                if not failures.failed(e):
                    continue
                # One row at a time runs in insertion order: the first unfinished row failed.
                first = next(g for g in groups if g.tasks)
                on_result(
                    error_result(
                        first.tasks.pop(0),
                        "out_of_memory" if is_oom(e) else "generation_error",
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
        """Log-probability of each of a task's choices after its prompt (see score.py)."""
        from mlxbatch.pipeline.engine.score import score_choices

        return score_choices(self, groups, on_scores, on_error, should_stop)

    def row_cache(self, share_prefix: bool = False) -> list[Any]:
        """An empty KV cache for one row (see cache.py for how rows' caches merge)."""
        from mlxbatch.pipeline.engine.row_kv import row_cache

        return row_cache(self.model, share_prefix and self.shares_prefixes)

    @functools.cached_property
    def prefills_rows(self) -> bool:
        """Whether the engine prefills prefixes (several together) and the rows after them
        itself (prefix.py), which leaves mlx-lm one token per row: only where the model's
        caches are plain KV."""
        from mlxbatch.pipeline.engine.row_kv import RowKVCache

        return all(isinstance(c, RowKVCache) for c in self.row_cache())

    @functools.cached_property
    def shares_prefixes(self) -> bool:
        """Whether batches may hold a shared prefix once (see cache.py), checked once."""
        from mlxbatch.pipeline.engine.attention import can_share_prefixes

        return can_share_prefixes(self.model)

    def prefill_prefixes(self, prefixes: list[list[int]]) -> list[list[Any]]:
        """A KV cache per prefix, each computed once for every row that starts with it;
        several prefixes are prefilled together where the model's caches allow (prefix.py)."""
        import mlx.core as mx

        from mlxbatch.pipeline.engine.prefix import prefill, prefill_prefixes

        self.stats.prefix_tokens += sum(len(p) for p in prefixes)
        if self.prefills_rows:
            return prefill_prefixes(
                self.model,
                prefixes,
                share_prefix=self.shares_prefixes,
                tokens_per_step=self.prefill_tokens_per_step,
            )
        caches = [self.row_cache() for _ in prefixes]
        for prefix, cache in zip(prefixes, caches, strict=True):
            prefill(self.model, mx.array([prefix]), cache)
        return caches

    def prefill_rows(self, prefix: list[Any], suffixes: list[list[int]]) -> list[Any] | None:
        """Each row's cache after its own tokens past `prefix` (a prefix cache), prefilled
        in batches of similar length (prefix.py); None where the caches are not plain KV."""
        from mlxbatch.pipeline.engine.prefix import prefill_rows

        if not self.prefills_rows:
            return None
        return prefill_rows(
            self.model, prefix, suffixes, tokens_per_step=self.prefill_tokens_per_step
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
