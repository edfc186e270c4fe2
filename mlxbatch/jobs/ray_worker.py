"""The Ray actor of a pool: the model loaded once, and `generate_window` over chunks of tasks.

It runs in a Ray worker process; ray_executor.py applies `ray.remote` and drives it. Nothing
here imports Ray.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from mlxbatch.jobs.dispatch import generate_window
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.records import Result, Task


class Worker:
    """One Ray actor: the model, loaded once, and `generate_window` over chunks of tasks.

    Runs in a Ray worker process (`ray.remote` is applied by the pool). `info` and `stop` run
    in a "control" concurrency group, so they answer while a chunk is being generated.
    """

    def __init__(self, spec: JobSpec):
        from mlxbatch.pipeline.engine import Engine

        self.spec = spec
        self.engine = Engine(
            spec.model,
            adapter_path=spec.adapter_path,
            dtype=spec.dtype,
            quantize=spec.quantize,
            trust_remote_code=spec.trust_remote_code,
        )
        self.stopping = threading.Event()

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "identity": self.engine.identity,
            "dtype": self.engine.dtype,
        }

    def stop(self) -> None:
        self.stopping.set()

    def generate(self, tasks: list[Task]) -> list[Result]:
        """Every task's Result (fewer once told to stop), in finishing order."""
        results: list[Result] = []
        if not self.stopping.is_set():
            generate_window(
                tasks,
                self.spec,
                self.engine,
                on_result=results.append,
                should_stop=self.stopping.is_set,
            )
        return results
