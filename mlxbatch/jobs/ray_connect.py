"""Reaching a Ray cluster for the pool in ray_executor.py: import, start or join, plan workers.

`connect` imports Ray (an optional dependency: `pip install 'mlxbatch[ray]'`) and starts a
local instance or joins a cluster, keeping the run's own signal handlers in place.
`worker_plan` decides how many actors to start and what each needs: an `mlx` resource unit
(a Mac started with `--resources='{"mlx": 1}'`), else a GPU, else a machine;
`failure_reason` is the line of a Ray error worth showing. It does not schedule any work
(ray_executor.py does).
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from typing import Any

from mlxbatch.pipeline.engine.errors import ModelLoadError

log = logging.getLogger("mlxbatch.ray")

INSTALL_HINT = "pip install 'mlxbatch[ray]'"
ADDRESS_PATTERN = re.compile(r"^(auto|local|ray://\S+|\S+:\d+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TRACE_LINES = ("^", "File ", "class_name:", "actor_id:", "pid:", "namespace:", "ip:")


class RayExecutorError(ModelLoadError):
    """Ray is missing or unreachable, or its workers cannot load the model or keep dying."""


def valid_address(address: str) -> bool:
    """'auto', 'local', HOST:PORT or ray://HOST:PORT."""
    return bool(ADDRESS_PATTERN.match(address))


def connect(address: str, *, quiet: bool) -> tuple[Any, bool]:
    """The `ray` module, initialized, and whether this call started it (to shut it down)."""
    try:
        import ray
    except ImportError:
        raise RayExecutorError(f"--ray needs Ray: {INSTALL_HINT}") from None
    if ray.is_initialized():
        return ray, False
    # ray.init installs its own SIGTERM handler; the run's handlers must stay in charge.
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        local: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if address == "auto" else {}
        ray.init(
            address=None if address == "auto" else address,
            **local,
            logging_level=logging.ERROR if quiet else logging.WARNING,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayExecutorError(
            f"could not start or reach Ray at {address!r}: {e} (is the cluster up? "
            "`ray status` says; with token authentication, set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN to the head's `ray get-auth-token`)"
        ) from None
    finally:
        if main:
            for s, handler in handlers.items():
                signal.signal(s, handler)
    return ray, True


def worker_plan(ray: Any, requested: int | None) -> tuple[int, dict[str, Any]]:
    """How many actors, and the resources of each: an `mlx` unit, else a GPU, else a machine."""
    resources = ray.cluster_resources()
    options: dict[str, Any]
    if resources.get("mlx", 0) >= 1:
        count, options = int(resources["mlx"]), {"resources": {"mlx": 1}}
    elif resources.get("GPU", 0) >= 1:
        count, options = int(resources["GPU"]), {"num_gpus": 1}
    else:
        count = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
        options = {"num_cpus": 1}
    if requested and requested > count and "num_cpus" not in options:
        log.warning(
            "%d Ray workers asked for, but the cluster has room for %d: the rest wait",
            requested,
            count,
        )
    return requested or count, {**options, "scheduling_strategy": "SPREAD"}


def failure_reason(e: BaseException) -> str:
    """The last meaningful line of a Ray error (its tracebacks are long)."""
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(_TRACE_LINES):
            return line[:300]
    return type(e).__name__
