"""Reporting: the environment record, the OpenBLAS check, the stdout table and the JSON file.

What it does: describes the machine and library versions (`environment`), warns when MLX on
a Linux CPU runs without OpenBLAS preloaded (`blas_warning`), prints one table per workload
with a row per contender, and writes everything as JSON.

What it does not do: run or time anything.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from benchmarks.contenders import Measurement

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def _loaded_blas() -> list[str]:
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "blas" in line.lower()}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def blas_warning(device: str) -> str | None:
    """A warning line when on CPU and OpenBLAS is not mapped into this process."""
    if device != "cpu" or sys.platform != "linux":
        return None
    if any("openblas" in p for p in _loaded_blas()):
        return None
    hint = (f"LD_PRELOAD={OPENBLAS}" if os.path.exists(OPENBLAS)
            else "apt-get install libopenblas0-pthread, then LD_PRELOAD=" + OPENBLAS)  # fmt: skip
    return (f"WARNING: MLX on CPU without OpenBLAS (reference BLAS, float32 matmul ~28x "
            f"slower); rerun with {hint}")  # fmt: skip


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def environment() -> dict[str, Any]:
    import mlx.core as mx
    import mlx_lm

    import mlxbatch

    info = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in mx.device_info().items()}  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(mx.default_device()),
        "device_info": info,
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
                     "mlxbatch": mlxbatch.__version__, "transformers": _version("transformers"),
                     "torch": _version("torch"), "python": platform.python_version()},
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "blas_loaded": _loaded_blas(),
        "ld_preload": os.environ.get("LD_PRELOAD"),
    }  # fmt: skip


def _mem(m: Measurement) -> str:
    if not m.peak_memory:
        return "-"
    suffix = {"mlx": "", "rss": " rss", "cuda": " cuda"}[m.memory_kind]
    return f"{m.peak_memory / 2**20:,.0f} MiB{suffix}"


def _num(x: float) -> str:
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def table(title: str, header: list[str], rows: list[Measurement], baseline: str) -> str:
    """One workload's table; the ratio is mlxbatch's prompts/s over the row's prompts/s."""
    base = next((m for m in rows if m.name == baseline), None)
    cols = ["contender", "prompts/s", "gen tok/s", "total tok/s", "wall s", "peak mem",
            "mlxbatch x", "notes"]  # fmt: skip
    lines = []
    for m in rows:
        pps = m.rate(m.prompts)
        ratio = base.rate(base.prompts) / pps if base and pps else None
        wall = f"~{_num(m.wall * m.scale)}*" if m.scale > 1 else _num(m.wall)
        lines.append([m.name, _num(pps), _num(m.rate(m.generated_tokens)),
                      _num(m.rate(m.prompt_tokens + m.generated_tokens)), wall, _mem(m),
                      f"{ratio:.2f}x" if ratio else "-", m.note])  # fmt: skip
    widths = [max(len(str(r[i])) for r in [cols, *lines]) for i in range(len(cols))]
    right = {1, 2, 3, 4, 5, 6}

    def fmt(r: list[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]  # fmt: skip
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(cols))
    out = [f"== {title} ==", *header, rule, fmt(cols), rule, *map(fmt, lines), rule]
    if any(m.scale > 1 for m in rows):
        out.append("* timed on a subset; rates are the subset's, wall s is extrapolated")
    out.append("mlxbatch x = mlxbatch prompts/s / this row's prompts/s (>1: mlxbatch is faster)")
    return "\n".join(out)


def agreement(reference: Measurement, other: Measurement) -> str | None:
    """How many rows' first-sample text matches mlxbatch's (greedy workloads only)."""
    if not reference.texts or not other.texts:
        return None
    common = [k for k in other.texts if k in reference.texts]
    same = sum(1 for k in common if other.texts[k] == reference.texts[k])
    return f"same text as mlxbatch {same}/{len(common)}"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
