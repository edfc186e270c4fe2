"""The only code that touches MLX: load a model, then generate Tasks with mlx-lm's BatchGenerator.

mlx and mlx_lm are imported inside functions, so `--help`, `validate` and `status` never pay
for them. Decoding is mlx-lm's continuous batching; this package adds what a batch job needs
around it: per-row seeded samplers whose draws do not depend on batch composition, stop
strings, and recovery from a failing step (out of memory) by halving the batch down to single
rows, where a row that still fails becomes an error record (and rows failing alike, one after
another, stop the run: errors.py). Ordering and batch sizing are decided by the caller
(pipeline/plan.py).

- model.py      Engine: load, dtype, memory budget, generate
- load.py       the model built and its weights read on a worker thread while the caller
                loads the tokenizer and renders
- readers.py    the weight tensors read on several threads at once
- batch.py      one BatchGenerator run over prefix groups, stop strings, logprobs
- decode.py     mlx-lm's decode step without a per-row logprobs split or a wasted last step,
                and prompt batches handed over to decoding without a copy
- sampling.py   batch-invariant seeded sampling and per-row logits processors
- cache.py      batch caches: a shared prefix held once per batch, causal prefill masks
- row_kv.py     one row's caches (and a prefilled batch's rows), and how they merge into one
- layout.py     array operations on batch KV layouts (re-align, gather, broadcast rows)
- cut_row.py    one row of a batch cache, cut out when first read
- prefix.py     prefix caches, many groups' prefixes in a few batches; rows after a prefix
- score.py      choice scoring: every choice of a task in one batched forward pass
- attention.py  attention while generating: shared prefixes (and whether a model takes them),
                grouped decode steps
- fused_attention.py  on CUDA, a decode step's attention as one kernel per layer (or two, a
                row's keys split across blocks where rows are few and long)
- decode_kernels.py   the CUDA source of those kernels
- errors.py     load errors, error records, what a run does after a failing step
- runtime.py    what `mlxbatch doctor` reports
"""

import os

# MLX's CUDA backend drops its whole cache of instantiated CUDA graphs once it holds more than
# MLX_CUDA_GRAPH_CACHE_SIZE (default 100), and a generation run makes more distinct graphs
# than that, so it instantiates them again and again. With 1000, 512 labelling rows on an
# H200 took 0.64-0.71 s instead of 0.78-0.90 s (benchmarks.timeline, three runs each). MLX
# reads it at its first CUDA launch; a value already set wins, and other backends ignore it.
os.environ.setdefault("MLX_CUDA_GRAPH_CACHE_SIZE", "1000")

from mlxbatch.pipeline.engine.attention import DECODE_ATTENTION_ENV  # noqa: E402
from mlxbatch.pipeline.engine.batch import INJECT_OOM_ENV  # noqa: E402
from mlxbatch.pipeline.engine.errors import (  # noqa: E402
    EngineBroken,
    ModelLoadError,
    UnsupportedMlxLm,
)
from mlxbatch.pipeline.engine.model import Engine, EngineStats  # noqa: E402
from mlxbatch.pipeline.engine.runtime import describe_runtime  # noqa: E402

__all__ = [
    "DECODE_ATTENTION_ENV",
    "INJECT_OOM_ENV",
    "Engine",
    "EngineBroken",
    "EngineStats",
    "ModelLoadError",
    "UnsupportedMlxLm",
    "describe_runtime",
]
