"""What `mlxbatch doctor` reports: versions, device, which BLAS MLX runs on, and the
environment settings that change how fast MLX and mlxbatch run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Read by MLX at its first CUDA launch, or by mlxbatch (README, Performance, says what each does).
SETTINGS = (
    "MLX_CUDA_GRAPH_CACHE_SIZE",
    "MLX_USE_CUDA_GRAPHS",
    "MLX_MAX_OPS_PER_BUFFER",
    "MLX_MAX_MB_PER_BUFFER",
    "MLXBATCH_DECODE_ATTENTION",
)


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
    # The engine package sets MLX_CUDA_GRAPH_CACHE_SIZE on import, so this shows what a run uses.
    report["settings"] = {name: os.environ[name] for name in SETTINGS if name in os.environ}
    return report
