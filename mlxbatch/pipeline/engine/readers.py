"""Read a model's weight tensors on several threads at once.

MLX reads a lazily loaded tensor on the thread that evaluates it, synchronously, one tensor
after another (on CUDA: into a fresh host buffer, then a copy to the device). Inside a run on
an H200 host, one thread read a 0.5B bf16 model in 0.20-0.22 s, four threads, each on its own
stream, in 0.14-0.18 s, eight no faster. Here mlx-lm's own `load_model` builds the model as
usual, but each weights file it opens has its tensors spread over the readers' streams,
largest first, so the readers' shares are about equal in bytes; `read` then evaluates each
share on its own thread.

It does not decide dtype, quantization or adapters (load.py), nor read anything but the
`.safetensors` files mlx-lm opens with `mx.load`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

READERS = 4  # at most; no more than the host's cores
_SWAP_LOCK = threading.Lock()


class SpreadLoads:
    """Stands in for `mlx.core` inside mlx_lm.utils while a model is built: `load` spreads
    a safetensors file's tensors over `streams` and keeps each stream's share for `read`."""

    def __init__(self, core: Any, streams: list[Any]):
        self._core, self._streams = core, streams
        self.shares: list[list[Any]] = [[] for _ in streams]
        self._bytes = [0] * len(streams)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def load(self, file: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not str(file).endswith(".safetensors"):
            return self._core.load(file, *args, **kwargs)
        # Opening a file lazily reads only its header: one opening per stream is cheap.
        copies = [self._core.load(file, stream=s) for s in self._streams]
        tensors = {}
        for name in sorted(copies[0], key=lambda n: -copies[0][n].nbytes):
            share = self._bytes.index(min(self._bytes))
            tensors[name] = copies[share][name]
            self._bytes[share] += tensors[name].nbytes
            self.shares[share].append(tensors[name])
        return {name: tensors[name] for name in copies[0]}


@contextlib.contextmanager
def spread_loads(device: Any) -> Iterator[SpreadLoads]:
    """Within this block mlx_lm.utils' `mx.load` spreads tensors over READERS streams.

    The streams are MLX's thread-unsafe kind, the one kind a thread other than their maker
    may evaluate on; each is only ever used by one reader at a time.
    """
    import mlx.core as mx
    import mlx_lm.utils

    count = max(1, min(READERS, os.cpu_count() or 1))
    spread = SpreadLoads(mx, [mx.new_thread_unsafe_stream(device) for _ in range(count)])
    # One build at a time swaps the module: two would put each other's tensors in their shares.
    with _SWAP_LOCK:
        mlx_lm.utils.mx = spread
        try:
            yield spread
        finally:
            mlx_lm.utils.mx = mx


def read(shares: list[list[Any]], parameters: list[Any]) -> None:
    """Evaluate each share's tensors that are themselves among `parameters` on a thread of
    its own; the first failure is raised once all threads are done.

    A tensor that the build turned into another (a dtype cast, quantization) is left to the
    caller's evaluation of the parameters, which frees each one once used: read here, all of
    them would be in memory at once next to what they became.
    """
    import mlx.core as mx

    wanted = {id(p) for p in parameters}
    shares = [[t for t in share if id(t) in wanted] for share in shares]
    errors: list[BaseException] = []

    def read_share(share: list[Any]) -> None:
        try:
            mx.eval(share)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=read_share, args=(s,)) for s in shares[1:] if s]
    for thread in threads:
        thread.start()
    read_share(shares[0])  # the caller's thread reads a share too
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
