"""The transformers contender: padded `model.generate` over the same weights and token ids.

What it does: if `import torch` works, loads the benchmark model directory with
`AutoModelForCausalLM` (a llama model with tied embeddings, which transformers reads as is),
left-pads mlxbatch's prompt token ids into fixed batches (64 and 256 by default, in file
order), and times `generate` (greedy, or sampling at the workload's temperature with
`num_return_sequences=n`). Generated tokens are counted per row up to the first EOS. Peak
memory is the CUDA allocator's peak on GPU, else the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs where Linux allows it).

What it does not do: install torch, sort by length, or use any other transformers feature
(no static cache, no compile); without torch, `available()` says why and nothing runs.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from typing import Any

from benchmarks.contenders import WARMUP_MAX_TOKENS, Measurement, PeerInputs
from benchmarks.workloads import Workload


def available() -> str | None:
    """None when torch and transformers import, else the reason they do not."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA install raising something else
        return f"{type(e).__name__}: {e}"
    return None


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_peak() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load(model_dir: str, dtype: str) -> tuple[Any, Any, float]:
    """(model, device, load seconds); float32 on CPU, the config's dtype on GPU unless given."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.float32 if device == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.to(device).eval()
    return model, device, time.perf_counter() - t0


def _generate(model: Any, device: str, prompts: list[list[int]], *, batch_size: int,
              max_tokens: int, workload: Workload, pad_id: int,
              eos_ids: set[int]) -> int:  # fmt: skip
    import torch

    generated = 0
    sampling = workload.temperature > 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                do_sample=sampling, temperature=workload.temperature if sampling else None,
                top_p=None, top_k=None, num_return_sequences=workload.n,
                pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
            )  # fmt: skip
        for row in out[:, width:].tolist():
            n = 0
            for token in row:
                if token in eos_ids:
                    break
                n += 1
            generated += n
    return generated


def run_transformers(workload: Workload, model: Any, device: str, tokenizer: Any,
                     inputs: PeerInputs, *, batch_size: int,
                     warmup_rows: int) -> Measurement:  # fmt: skip
    import torch

    eos_ids = set(tokenizer.eos_token_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    kwargs = dict(batch_size=batch_size, workload=workload, pad_id=pad_id, eos_ids=eos_ids)
    t0 = time.perf_counter()
    _generate(model, device, inputs.prompts[:warmup_rows],
              max_tokens=min(workload.max_tokens, WARMUP_MAX_TOKENS), **kwargs)  # fmt: skip
    warm_wall = time.perf_counter() - t0
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_rss_peak()
    t0 = time.perf_counter()
    generated = _generate(model, device, inputs.prompts, max_tokens=workload.max_tokens,
                             **kwargs)  # fmt: skip
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cuda = device == "cuda"
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_peak()
    return Measurement(
        name=f"transformers bs={batch_size}", prompts=len(inputs.prompts),
        samples=len(inputs.prompts) * inputs.n, prompt_tokens=inputs.prompt_tokens,
        generated_tokens=generated, wall=wall, peak_memory=peak,
        memory_kind="cuda" if cuda else "rss", warmup_wall=warm_wall,
        note=f"left-padded, file order, {device}, torch {torch.__version__}",
    )  # fmt: skip
