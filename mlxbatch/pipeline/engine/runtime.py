"""What `mlxbatch doctor` reports: versions, device, and which BLAS MLX runs on."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
