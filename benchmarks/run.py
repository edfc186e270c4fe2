"""`python -m benchmarks.run`: mlxbatch against its anchors, side by side, in one process.

What it does: parses the flags, builds or reuses the model (`.bench/models/`) and the
workload files (`.bench/data/`), runs the chosen contenders on each workload in a fixed order
(mlxbatch first, before any peer model is resident, so peak memory is not shared), prints a
table per workload and writes one JSON document (environment, args, every measurement).
`--quick` is a ~2 minute CPU smoke run: tiny model, 16 rows, 16 new tokens, mixed and
labelling, 2 warm-up rows, the generate loop timed on 8 prompts.

What it does not do: tune anything, retry failed contenders (a failure is reported and the
rest go on), or set LD_PRELOAD for you (it warns when OpenBLAS is missing on CPU).
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import contenders as C
from benchmarks import hf, report
from benchmarks.models import BENCH_DIR, SHAPES, bench_model, describe
from benchmarks.workloads import WORKLOADS, Workload, make_workload

CONTENDERS = ("mlxbatch", "mlxbatch-noprefix", "generate", "batch_generate", "transformers")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--workload",
        choices=[*WORKLOADS, "all"],
        help="default: mixed (with --quick: mixed and labelling)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny CPU smoke run: tiny model, 16 rows, 16 new tokens, mixed+labelling",
    )
    p.add_argument(
        "--model-shape",
        choices=sorted(SHAPES),
        help="random-weight model to build/reuse (default: tiny on CPU, qwen05b on GPU)",
    )
    p.add_argument("--model", help="use this existing model directory instead of building one")
    p.add_argument(
        "--rows", type=int, help="prompts per workload (default 512 GPU / 64 CPU; synthetic: 64)"
    )
    p.add_argument("--max-tokens", type=int, help="override the workload's new-token count")
    p.add_argument("--template", help="labelling row template (default: 'Review: {{ text }}...')")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument(
        "--loop-limit",
        type=int,
        help="time mlx_lm.generate on the first N generations (prompts x n, whole prompts) "
        "only and extrapolate (default 16 on CPU, all on GPU; 0 = all)",
    )
    p.add_argument("--hf-batch-sizes", default="64,256", help="transformers batch sizes")
    p.add_argument(
        "--warmup-rows",
        type=int,
        help="rows in each batched contender's warm-up run (default: all on GPU, where MLX "
        "compiles kernels for each new batch shape; 8 on CPU; --quick: 2)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="model dtype for every contender (auto: "
        "float32 on CPU, the checkpoint's dtype on GPU, as mlxbatch does)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed runs of each mlxbatch contender, the median reported (peers run once)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated prompt files")
    p.add_argument("--tmp-dir", help="where mlxbatch's output file and store go (default: $TMPDIR)")
    p.add_argument("--json", help="results file (default .bench/results-<device>-<workload>.json)")
    args = p.parse_args(argv)  # fmt: skip
    chosen = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CONTENDERS))
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
    args.contenders = chosen
    return args


def _guard(name: str, errors: dict[str, str], fn: Callable[[], Any]) -> Any:
    """Run one contender; a failure is printed and recorded, and the benchmark goes on."""
    try:
        return fn()
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        errors[name] = f"{type(e).__name__}: {e}"
        print(f"{name}: FAILED ({errors[name]})", flush=True)
        return None


def run_workload(wl: Workload, model: str, args: argparse.Namespace, device: str) -> dict:
    import mlx.core as mx

    want = set(args.contenders)
    results: list[C.Measurement] = []
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    print(f"\n-- workload {wl.name}: {wl.rows} prompts x n={wl.n}, {wl.max_tokens} new tokens, "
          f"{wl.path}", flush=True)  # fmt: skip

    def add(name: str, fn: Callable[[], Any]) -> None:
        print(f"   running {name} ...", flush=True)
        m = _guard(name, errors, fn)
        if m is not None:
            results.extend(m if isinstance(m, list) else [m])

    common = dict(warmup_rows=args.warmup_rows, dtype=args.dtype, tmp_root=args.tmp_dir,
                  repeat=args.repeat)  # fmt: skip
    if "mlxbatch" in want:
        add("mlxbatch", lambda: C.run_mlxbatch(wl, model, **common))
    if "mlxbatch-noprefix" in want:
        if C.has_prefix_cache_option():
            add(
                "mlxbatch-noprefix",
                lambda: C.run_mlxbatch(
                    wl, model, prefix_cache=False, name="mlxbatch (no prefix reuse)", **common
                ),
            )
        else:
            skipped["mlxbatch-noprefix"] = "JobSpec has no prefix_cache field yet"

    peers = [c for c in ("generate", "batch_generate") if c in want]
    inputs = None
    if peers or "transformers" in want:
        loaded = _guard("load", errors, lambda: C.load_peer_model(model, args.dtype))
        if loaded is not None:
            peer_model, tokenizer, load_s = loaded
            print(f"   peer model loaded in {load_s:.2f}s (not timed)", flush=True)
            inputs = _guard("tokenize", errors, lambda: C.peer_inputs(wl, model, tokenizer))
        if inputs is not None:
            if "generate" in peers:
                limit = args.loop_limit if args.loop_limit is not None else (
                    16 if device == "cpu" else 0)  # fmt: skip
                add(
                    "generate",
                    lambda: C.run_generate_loop(
                        wl, peer_model, tokenizer, inputs, limit=limit or None
                    ),
                )
            if "batch_generate" in peers:
                add(
                    "batch_generate",
                    lambda: C.run_batch_generate(
                        wl, peer_model, tokenizer, inputs, warmup_rows=args.warmup_rows
                    ),
                )
        loaded = peer_model = None  # free the MLX weights before transformers loads its own
        gc.collect()
        mx.clear_cache()
    if "transformers" in want:
        reason = hf.available()
        if reason is not None:
            skipped["transformers"] = f"torch/transformers not importable ({reason})"
        elif inputs is not None:
            add("transformers", lambda: _run_hf(wl, model, tokenizer, inputs, args))

    base = next((m for m in results if m.name == "mlxbatch"), None)
    if base is not None:
        if inputs is not None and inputs.prompt_tokens != base.prompt_tokens:
            print(f"WARNING: peers' prompt tokens ({inputs.prompt_tokens}) differ from "
                  f"mlxbatch's ({base.prompt_tokens})", flush=True)  # fmt: skip
        for m in results:
            same = report.agreement(base, m) if m is not base and wl.temperature == 0 else None
            if same:
                m.note = f"{m.note}; {same}" if m.note else same
    mean_prompt = (inputs.prompt_tokens / inputs.n / len(inputs.prompts)) if inputs else None
    header = [f"model {model} {describe(Path(model))}",
              f"{wl.rows} prompts x n={wl.n}, max_tokens {wl.max_tokens}, temperature "
              f"{wl.temperature}" + (f", mean prompt {mean_prompt:.0f} tokens" if mean_prompt
                                     else "")]  # fmt: skip
    header += [f"skipped {k}: {v}" for k, v in skipped.items()]
    header += [f"FAILED {k}: {v}" for k, v in errors.items()]
    print(report.table(f"{wl.name} on {device}", header, results, "mlxbatch"), flush=True)
    return {"workload": wl.describe(), "mean_prompt_tokens": mean_prompt,
            "results": [m.to_json() for m in results], "skipped": skipped,
            "errors": errors}  # fmt: skip


def _run_hf(wl: Workload, model: str, tokenizer: Any, inputs: C.PeerInputs,
            args: argparse.Namespace) -> list[C.Measurement]:  # fmt: skip
    hf_model, device, load_s = hf.load(model, args.dtype)
    print(f"   transformers model loaded in {load_s:.2f}s on {device} (not timed)", flush=True)
    out = []
    for bs in (int(b) for b in args.hf_batch_sizes.split(",") if b.strip()):
        out.append(hf.run_transformers(wl, hf_model, device, tokenizer, inputs, batch_size=bs,
                                       warmup_rows=args.warmup_rows))  # fmt: skip
    return out


def _token_counter(model: str) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlx.core as mx

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    warning = report.blas_warning(device)
    if warning:
        print(warning, flush=True)
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload or "mixed"]
    if args.quick:
        args.model_shape = args.model_shape or "tiny"
        args.rows = args.rows or 16
        args.max_tokens = args.max_tokens or 16
        args.warmup_rows = args.warmup_rows or 2
        args.loop_limit = 8 if args.loop_limit is None else args.loop_limit
        workloads = ["mixed", "labelling"] if args.workload is None else workloads
    # A warm-up over every row shows each batched contender all of its batch shapes once.
    args.warmup_rows = args.warmup_rows or (1 << 30 if device == "gpu" else 8)
    model = bench_model(args.model, args.model_shape, device == "gpu")
    counter = _token_counter(model)
    env = report.environment()
    print(f"device {env['device']} {env['device_info']}, mlx {env['versions']['mlx']}, "
          f"mlx-lm {env['versions']['mlx_lm']}, mlxbatch {env['versions']['mlxbatch']}, "
          f"blas {env['blas_loaded'] or 'reference (not OpenBLAS)'}", flush=True)  # fmt: skip
    default_rows = 512 if device == "gpu" else 64
    results = {}
    for name in workloads:
        wl = make_workload(name, BENCH_DIR / "data", rows=args.rows, max_tokens=args.max_tokens,
                           seed=args.seed, count_tokens=counter, template=args.template,
                           default_rows=default_rows)  # fmt: skip
        results[name] = run_workload(wl, model, args, device)
    label = "quick" if args.quick else args.workload or "mixed"
    path = Path(args.json or BENCH_DIR / f"results-{device}-{label}.json")
    document = {**env, "args": vars(args), "model": model, "model_config": describe(Path(model)),
                "blas_warning": warning, "workloads": results}  # fmt: skip
    report.write_json(path, document)
    print(f"\nwrote {path}")
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
