"""Load a model's weights on a worker thread while the caller loads the tokenizer and renders.

A run needs the tokenizer, the config and the model's identity to render prompts, and the
weights only when it generates. Reading the weights took ~0.2 s of a 1.2 s labelling run (0.5B
bf16 model, H200 host), time the caller can spend rendering instead. The worker builds the
model lazily (config, dtype, in-memory quantization: what the identity needs), says so, then
reads the weights, on several threads (readers.py). MLX streams belong to the thread that made
them, so the worker builds on a stream of its own; the caller touches the arrays only after
`model()` returned.

It does not load the tokenizer or decide anything about batches (model.py does).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from mlxbatch.pipeline.engine.errors import ModelLoadError
from mlxbatch.pipeline.engine.readers import read, spread_loads


class WeightsLoader:
    """Starts loading at construction; `wait_built` returns once the structure (config,
    dtype) is known, `model` once the weights are read."""

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        adapter_path: str | None,
        dtype: str,
        quantize: int | None,
        trust_remote_code: bool,
    ):
        self._args = (path, name, adapter_path, dtype, quantize, trust_remote_code)
        self._built = threading.Event()
        self._error: BaseException | None = None
        self._model: Any = None
        self._shares: list[list[Any]] = []  # lazily loaded tensors, one list per reader
        self.config: dict = {}
        self.dtype = "unknown"
        # Not a daemon: a process that ends while the weights load (everything already done,
        # an error, a signal) waits for the read; ending inside MLX aborted it (exit 134).
        self._thread = threading.Thread(target=self._load, name="mlxbatch-load")
        self._thread.start()

    def wait_built(self) -> None:
        """Wait for the model's structure; raises what failed while building it."""
        self._built.wait()
        if self._model is None:  # the build failed; a failed read is reported by model()
            self._thread.join()
            assert self._error is not None
            raise self._error

    def model(self) -> Any:
        """The model, its weights in memory (waits for the worker)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._model

    def _load(self) -> None:
        import mlx.core as mx

        try:
            with mx.stream(mx.new_stream(mx.default_device())):
                with spread_loads(mx.default_device()) as spread:
                    self._build(mx)
                self._shares = spread.shares
                self._built.set()
                self._read_weights()
        except BaseException as e:  # re-raised in the caller's thread
            self._error = e
        finally:
            self._built.set()
            # A stream outliving its thread aborted the process at exit, now and then.
            mx.clear_streams()

    def _read_weights(self) -> None:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        parameters = [v for _, v in tree_flatten(self._model.parameters())]
        read(self._shares, parameters)  # the tensors the model uses as they are, in parallel
        self._shares = []
        mx.eval(parameters)  # what the build made of the others (dtype, quantization)

    def _build(self, mx: Any) -> None:
        from mlx.utils import tree_flatten
        from mlx_lm.utils import load_adapters, load_model, quantize_model

        path, name, adapter_path, dtype, quantize, trust_remote_code = self._args
        model, config = load_model(path, lazy=True, trust_remote_code=trust_remote_code)
        if adapter_path is not None:
            model = load_adapters(model, adapter_path)
            model.eval()
        if dtype == "auto" and mx.default_device() == mx.cpu:
            dtype = "float32"  # bfloat16/float16 matmul is many times slower than float32 on CPU
        if dtype != "auto":
            model.set_dtype(getattr(mx, dtype))
        if quantize:
            if "quantization" in config:
                raise ModelLoadError(f"{name} is already quantized; drop --quantize")
            # In memory only: the original weights on disk stay as they are.
            model, config = quantize_model(model, config, 64, quantize)
        params = tree_flatten(model.parameters())
        floats = [v.dtype for _, v in params if mx.issubdtype(v.dtype, mx.floating)]
        self.dtype = str(floats[0]).rsplit(".", 1)[-1] if floats else "unknown"
        self._model, self.config = model, config
