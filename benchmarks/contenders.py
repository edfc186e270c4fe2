"""The MLX contenders: mlxbatch end to end, `mlx_lm.generate` in a loop, `mlx_lm.batch_generate`.

What it does: runs one workload through each contender, warm-up first (the same kind of run
on the first few rows with at most 16 new tokens), then a timed run with MLX's peak memory
reset, and returns a `Measurement` with exact prompt/generated token counts.

- mlxbatch: `run_job(JobSpec(...))` from file to file in a temp dir: input checking, model
  load, rendering, store and export all inside the wall clock.
- the peers get the SAME prompt token ids mlxbatch generates from (mlxbatch's own read,
  validate and render path) and the same weights and dtype (loaded through mlxbatch's Engine,
  which is `mlx_lm.load` plus the CPU float32 rule); their model load is not timed.
- `generate`: `mlx_lm.stream_generate` (the loop inside `mlx_lm.generate`, which returns only
  text) one prompt and sample at a time; `limit` times only the first
  generations (whole prompts) and scales up.
- `batch_generate`: one call with its default batch sizes, prompts in file order, each
  prompt repeated n times, one shared sampler.

What it does not do: transformers (see hf.py), tables or JSON (see report.py).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.workloads import Workload, write_subset

WARMUP_MAX_TOKENS = 16


@dataclass
class Measurement:
    name: str
    prompts: int  # input prompts timed (a prompt with n samples counts once)
    samples: int  # outputs timed (prompts x n)
    prompt_tokens: int  # prompt tokens over all samples
    generated_tokens: int
    wall: float  # seconds for the timed part
    peak_memory: int  # bytes
    memory_kind: str  # "mlx" (mx.get_peak_memory), "rss" or "cuda"
    warmup_wall: float = 0.0
    scale: float = 1.0  # > 1 when only a subset was timed: whole workload / timed part
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    texts: dict[Any, str] | None = None  # first sample's text per row id (not in the JSON)

    def rate(self, amount: float) -> float:
        return amount / self.wall if self.wall > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("texts")
        d.update(prompts_per_s=self.rate(self.prompts),
                 generated_tokens_per_s=self.rate(self.generated_tokens),
                 total_tokens_per_s=self.rate(self.prompt_tokens + self.generated_tokens),
                 estimated_full_wall=self.wall * self.scale)  # fmt: skip
        return d


def _reset_memory() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def has_prefix_cache_option() -> bool:
    from mlxbatch.jobs.spec import SPEC_FIELDS

    return "prefix_cache" in SPEC_FIELDS


def run_mlxbatch(workload: Workload, model: str, *, warmup_rows: int, dtype: str = "auto",
                 tmp_root: str | None = None, prefix_cache: bool | None = None,
                 name: str = "mlxbatch", repeat: int = 1) -> Measurement:  # fmt: skip
    """mlxbatch end to end: file in, file out, store included, in a fresh temp dir. With
    `repeat` > 1 the timed run is repeated (each from an empty store) and the median kept."""
    import mlx.core as mx

    from mlxbatch.jobs.runner import run_job
    from mlxbatch.jobs.spec import JobSpec

    extra_fields = {} if prefix_cache is None else {"prefix_cache": prefix_cache}
    with tempfile.TemporaryDirectory(prefix="mlxbatch-bench-", dir=tmp_root) as tmp:
        common = dict(model=model, dtype=dtype, quiet=True, fresh=True, **extra_fields)
        warm_in = write_subset(workload, warmup_rows, Path(tmp))
        warm = workload.spec_kwargs() | {"max_tokens": min(workload.max_tokens, WARMUP_MAX_TOKENS)}
        t0 = time.perf_counter()
        run_job(JobSpec(input=str(warm_in), output=f"{tmp}/warm.out.jsonl", **common, **warm))
        warm_wall = time.perf_counter() - t0

        out = Path(tmp) / "out.jsonl"
        spec = JobSpec(input=str(workload.path), output=str(out), **common,
                       **workload.spec_kwargs())  # fmt: skip
        runs, peak = [], 0
        for _ in range(max(1, repeat)):
            _reset_memory()
            t0 = time.perf_counter()
            summary = run_job(spec)
            runs.append((time.perf_counter() - t0, summary))
            peak = max(peak, mx.get_peak_memory())
        walls = [w for w, _ in runs]
        wall, summary = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        store_bytes = sum(p.stat().st_size for p in Path(tmp).glob("out.jsonl.mlxbatch.sqlite*"))
    texts: dict[Any, str] = {}
    for row in rows:
        texts.setdefault(row.get("id"), row.get("output") or "")
    failed = sum(1 for r in rows if r.get("error"))
    overhead = summary.store_seconds + summary.export_seconds
    note = (
        "wall includes model load, input checks, store, export "
        f"(store + export {100 * overhead / wall:.1f}% of wall)"
    )
    if len(walls) > 1:
        note += f"; median of {len(walls)}: " + " / ".join(f"{w:.2f}" for w in walls) + " s"
    if failed:
        note += f"; {failed} rows FAILED"
    return Measurement(
        name=name, prompts=workload.rows, samples=summary.ok + summary.failed,
        prompt_tokens=summary.prompt_tokens, generated_tokens=summary.generated_tokens,
        wall=wall, peak_memory=peak, memory_kind="mlx", warmup_wall=warm_wall, note=note,
        extra={"summary_wall": summary.wall, "summary_status": summary.status,
               "summary_peak_memory": summary.peak_memory, "output_rows": len(rows),
               "failed": failed, "store_bytes": store_bytes, "spec_extra": extra_fields,
               "store_seconds": summary.store_seconds,
               "export_seconds": summary.export_seconds,
               "first_generation_after": summary.first_generation_after,
               "walls": walls},
        texts=texts,
    )  # fmt: skip


@dataclass
class PeerInputs:
    """What every peer generates from: mlxbatch's own token ids, in file order."""

    ids: list[Any]
    prompts: list[list[int]]
    n: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts) * self.n


def load_peer_model(model: str, dtype: str = "auto") -> tuple[Any, Any, float]:
    """(model, tokenizer, load seconds) with exactly the weights and dtype mlxbatch uses."""
    from mlxbatch.pipeline.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(model, dtype=dtype)
    return engine.model, engine.tokenizer, time.perf_counter() - t0


def peer_inputs(workload: Workload, model: str, tokenizer: Any) -> PeerInputs:
    """Token ids exactly as mlxbatch renders them (template, system prompt, chat template)."""
    from mlxbatch.jobs.inputs import check_inputs, iter_requests
    from mlxbatch.jobs.spec import JobSpec
    from mlxbatch.pipeline.render import render_tasks

    spec = JobSpec(input=str(workload.path), model=model, **workload.spec_kwargs())
    check = check_inputs(spec)
    tasks = render_tasks(iter_requests(spec, check.kind), tokenizer, model_identity="bench",
                         template=spec.template, system=spec.system,
                         use_chat_template=spec.chat_template)  # fmt: skip
    firsts = [t for t in tasks if t.sample_index == 0]
    errors = [t for t in firsts if t.error]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed to render, e.g. {errors[0].error}")
    return PeerInputs([t.id for t in firsts], [t.prompt_ids for t in firsts], workload.n)


def _sampler(workload: Workload) -> Any:
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=workload.temperature) if workload.temperature > 0 else None


def _loop(model: Any, tokenizer: Any, prompts: list[list[int]], n: int, max_tokens: int,
          sampler: Any) -> tuple[int, list[str]]:  # fmt: skip
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    generated, texts = 0, []
    for ids in prompts:
        for sample in range(n):
            text, last = "", None
            for last in stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_tokens,
                                        sampler=sampler):  # fmt: skip
                text += last.text
            assert last is not None
            # generation_tokens counts an EOS that ended the row; the text does not hold it.
            generated += last.generation_tokens - (last.finish_reason == "stop")
            if sample == 0:
                texts.append(text)
    return generated, texts


def run_generate_loop(workload: Workload, model: Any, tokenizer: Any, inputs: PeerInputs, *,
                      limit: int | None) -> Measurement:  # fmt: skip
    import mlx.core as mx

    sampler = _sampler(workload)
    t0 = time.perf_counter()
    _loop(model, tokenizer, inputs.prompts[:1], 1, min(workload.max_tokens, WARMUP_MAX_TOKENS),
          sampler)  # fmt: skip
    warm_wall = time.perf_counter() - t0
    # `limit` counts generations (prompts x n), rounded down to whole prompts.
    timed = inputs.prompts[: max(1, limit // inputs.n)] if limit else inputs.prompts
    _reset_memory()
    t0 = time.perf_counter()
    generated, texts = _loop(model, tokenizer, timed, inputs.n, workload.max_tokens, sampler)
    wall = time.perf_counter() - t0
    scale = len(inputs.prompts) / len(timed)
    note = f"timed first {len(timed)}/{len(inputs.prompts)} prompts" if scale > 1 else ""
    return Measurement(
        name="mlx_lm.generate loop", prompts=len(timed), samples=len(timed) * inputs.n,
        prompt_tokens=sum(len(p) for p in timed) * inputs.n, generated_tokens=generated,
        wall=wall, peak_memory=mx.get_peak_memory(), memory_kind="mlx", warmup_wall=warm_wall,
        scale=scale, note=note, texts=dict(zip(inputs.ids, texts, strict=False)),
    )  # fmt: skip


def run_batch_generate(workload: Workload, model: Any, tokenizer: Any, inputs: PeerInputs, *,
                       warmup_rows: int) -> Measurement:  # fmt: skip
    import mlx.core as mx
    from mlx_lm.generate import batch_generate

    sampler = _sampler(workload)
    kwargs = {"sampler": sampler} if sampler is not None else {}

    def call(prompts: list[list[int]], max_tokens: int) -> Any:
        repeated = [p for p in prompts for _ in range(inputs.n)]
        return batch_generate(model, tokenizer, repeated, max_tokens=max_tokens,
                              return_token_ids=True, **kwargs)  # fmt: skip

    t0 = time.perf_counter()
    call(inputs.prompts[:warmup_rows], min(workload.max_tokens, WARMUP_MAX_TOKENS))
    warm_wall = time.perf_counter() - t0
    _reset_memory()
    t0 = time.perf_counter()
    response = call(inputs.prompts, workload.max_tokens)
    wall = time.perf_counter() - t0
    generated = sum(len(t) for t in response.token_ids)
    firsts = response.texts[:: inputs.n]
    return Measurement(
        name="mlx_lm.batch_generate", prompts=len(inputs.prompts),
        samples=len(response.texts), prompt_tokens=inputs.prompt_tokens,
        generated_tokens=generated, wall=wall, peak_memory=mx.get_peak_memory(),
        memory_kind="mlx", warmup_wall=warm_wall, note="defaults, file order",
        texts=dict(zip(inputs.ids, firsts, strict=True)),
    )  # fmt: skip
