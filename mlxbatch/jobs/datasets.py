"""`mlxbatch export OUTPUT --format chat|completions|text`: a fine-tuning set for `mlx_lm.lora`.

Writes `train.jsonl`, `valid.jsonl` and `test.jsonl` in the shapes mlx-lm's dataset loader
reads: chat `{"messages": [system?, user..., {"role": "assistant", "content": output}]}`,
completions `{"prompt", "completion"}`, text `{"text": prompt as the model saw it + output}`.
The prompt side is rebuilt from the input that the store's last run read, with that run's
template, system prompt and chat-template setting (its JobSpec, stored with the run); the
answer is the stored output. Only rows that succeeded are used; exact duplicates are dropped
(the first is kept); `max_length` drops examples longer than that many tokens, counted with the
model's tokenizer as mlx-lm counts them. A row goes to a split by a hash of its id (all samples
of a row go together), so the same rows land in the same split on every export. Every file is
written atomically; a split that gets no rows is not written (mlx-lm cannot read an empty file).

What it does not do: generate, shuffle (mlx_lm.lora does), or stream: the kept examples are held
in memory until written. The tokenizer (mlx-lm, so mlx) is loaded only when needed: `--format
text` of chat rows, prompts given as token ids, and `--max-length`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxbatch.jobs.atomic import write_lines_atomic
from mlxbatch.jobs.inputs import iter_requests
from mlxbatch.jobs.spec import SPEC_FIELDS, JobSpec
from mlxbatch.jobs.store import Store
from mlxbatch.pipeline.render import TemplateError, prompt_text, render_text, with_system
from mlxbatch.records import TEMPLATE, Request

FORMATS = ("chat", "completions", "text")
SPLITS = ("train", "valid", "test")


class DatasetError(Exception):
    """The store or its input cannot give a dataset (no run, input changed, nothing to write)."""


@dataclass
class DatasetReport:
    out_dir: str
    format: str
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    left_out: dict[str, int] = field(default_factory=dict)

    def leave_out(self, why: str) -> None:
        self.left_out[why] = self.left_out.get(why, 0) + 1


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.9,0.05,0.05' (or 'train,valid' with no test) -> three fractions summing to 1."""
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 2:
        parts.append(0.0)
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise ValueError(
            f"{text!r}: give train,valid,test fractions that sum to 1, e.g. 0.9,0.05,0.05"
        )
    return parts[0], parts[1], parts[2]


def split_of(row_id: Any, fractions: tuple[float, float, float]) -> str:
    """The split of a row id: a fixed function of the id, not a random draw."""
    digest = hashlib.sha256(json.dumps(row_id).encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    if point < fractions[0]:
        return "train"
    return "valid" if point < fractions[0] + fractions[1] or not fractions[2] else "test"


def run_spec(run: dict) -> JobSpec:
    """The JobSpec of a stored run, re-reading the input it read (by absolute path if known)."""
    values = {k: v for k, v in (run.get("spec") or {}).items() if k in SPEC_FIELDS}
    spec = JobSpec(**values)
    recorded = ((run.get("provenance") or {}).get("input") or {}).get("path")
    # The schemas only checked rows and constrained outputs; rebuilding prompts needs neither.
    return dataclasses.replace(
        spec, input=recorded or run["input"], input_schema=None, json_schema=None
    )


def load_tokenizer(run: dict) -> Any:
    """The run's tokenizer, loaded the way mlx-lm loads it (mlx is imported here, not before)."""
    from mlxbatch.pipeline.engine.tokenizer import load_tokenizer as load_through_mlx_lm

    model = ((run.get("provenance") or {}).get("model") or {}).get("path") or run["model"]
    spec = run.get("spec") or {}
    config_file = Path(model, "config.json")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    extra = {"trust_remote_code": bool(spec.get("trust_remote_code"))}
    return load_through_mlx_lm(Path(model), extra, eos_token_ids=config.get("eos_token_id"))


def prompt_messages(request: Request, spec: JobSpec, tokenizer: Callable[[], Any]) -> list[dict]:
    """The prompt as chat messages: what the run sent, before the model's chat template."""
    if request.kind == TEMPLATE:
        assert spec.template is not None
        text = render_text(spec.template, request.fields or {})
        return with_system([{"role": "user", "content": text}], spec.system)
    if request.messages is not None:
        return with_system(request.messages, spec.system)
    if request.prompt_ids is not None:
        return [{"role": "user", "content": tokenizer().decode(request.prompt_ids)}]
    return [{"role": "user", "content": request.prompt or ""}]


def example(
    fmt: str, request: Request, output: str, spec: JobSpec, tokenizer: Callable[[], Any]
) -> dict | None:
    """One training example, or None when the prompt does not fit `fmt` (multi-turn chats)."""
    if fmt == "text":
        if request.prompt is not None:  # raw text rows: no template, no tokenizer
            return {"text": request.prompt + output}
        text, _ = prompt_text(
            request,
            tokenizer(),
            template=spec.template,
            system=spec.system,
            use_chat_template=spec.chat_template,
        )
        return {"text": text + output}
    messages = prompt_messages(request, spec, tokenizer)
    if fmt == "chat":
        return {"messages": [*messages, {"role": "assistant", "content": output}]}
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    if len(turns) != 1 or turns[0]["role"] != "user":
        return None
    prompt = "\n\n".join([*system, turns[0]["content"]])
    return {"prompt": prompt, "completion": output}


def token_length(fmt: str, record: dict, tokenizer: Any) -> int:
    """Tokens mlx_lm.lora trains on for `record` (tuner/datasets.py's own tokenization)."""
    if fmt == "text":
        ids = tokenizer.encode(record["text"])
        return len(ids) + (0 if ids and ids[-1] == tokenizer.eos_token_id else 1)
    if fmt == "completions":
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        messages = record["messages"]
    return len(tokenizer.apply_chat_template(messages, return_dict=False))


def _length(fmt: str, record: dict, tokenizer: Any, spec: JobSpec, line: int) -> int:
    try:
        return token_length(fmt, record, tokenizer)
    except ValueError as e:  # transformers: no chat template to count with
        raise DatasetError(f"{spec.input}:{line}: cannot count tokens: {e}") from None


def export_dataset(
    store: Store,
    out_dir: str,
    fmt: str,
    fractions: tuple[float, float, float],
    *,
    max_length: int | None = None,
    drop_truncated: bool = False,
) -> DatasetReport:
    """Write train/valid/test.jsonl under `out_dir` from the store's last run."""
    run = store.last_run()
    if run is None:
        raise DatasetError(f"{store.path}: the store holds no run yet")
    spec = run_spec(run)
    loaded: list[Any] = []

    def tokenizer() -> Any:
        if not loaded:
            loaded.append(load_tokenizer(run))
        return loaded[0]

    report = DatasetReport(out_dir=out_dir, format=fmt)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    seen: set[bytes] = set()
    requests = iter_requests(spec, run["kind"])
    request: Request | None = None
    for row in store.export_rows():
        while request is None or request.line < row.line:
            request = next(requests, None)
            if request is None:
                raise DatasetError(_changed(spec.input, row.line))
        if request.line != row.line or request.id != row.id:
            raise DatasetError(_changed(spec.input, row.line))
        if row.finish_reason is None:
            report.leave_out("pending")
            continue
        if row.finish_reason == "error" or row.error_code is not None:
            report.leave_out("failed")
            continue
        if drop_truncated and row.finish_reason == "length":
            report.leave_out("truncated")
            continue
        try:
            record = example(fmt, request, row.text or "", spec, tokenizer)
        except (TemplateError, ValueError) as e:  # e.g. a model without a chat template
            raise DatasetError(f"{spec.input}:{row.line}: {e}") from None
        if record is None:
            report.leave_out("multi-turn")
            continue
        line = json.dumps(record, ensure_ascii=False)
        digest = hashlib.sha256(line.encode()).digest()
        if digest in seen:
            report.leave_out("duplicate")
            continue
        seen.add(digest)
        if (
            max_length is not None
            and _length(fmt, record, tokenizer(), spec, row.line) > max_length
        ):
            report.leave_out(f"longer than {max_length} tokens")
            continue
        lines[split_of(row.id, fractions)].append(line)
    if not any(lines.values()):
        raise DatasetError(f"{store.path}: no successful rows to export")
    os.makedirs(out_dir, exist_ok=True)
    for split, split_lines in lines.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        if split_lines:
            write_lines_atomic(path, split_lines)
        elif os.path.exists(path):
            os.unlink(path)  # a split from an earlier export would be mixed into training
        report.written[split] = len(split_lines)
    return report


def publish(
    store: Store,
    run: dict,
    out_dir: str,
    fmt: str,
    fractions: tuple[float, float, float],
    max_length: int | None = None,
    drop_truncated: bool = False,
) -> DatasetReport:
    """`export_dataset`, then `out_dir/manifest.json`: the run's provenance, the files' hashes."""
    from mlxbatch.jobs import provenance

    report = export_dataset(
        store, out_dir, fmt, fractions, max_length=max_length, drop_truncated=drop_truncated
    )
    hashes = {
        split: provenance.file_sha256(os.path.join(out_dir, f"{split}.jsonl"))
        for split, n in report.written.items()
        if n
    }
    manifest = provenance.for_export(
        run,
        out_dir,
        sum(report.written.values()),
        format=fmt,
        split=dict(zip(SPLITS, fractions, strict=True)),
        max_length=max_length,
        drop_truncated=drop_truncated,
        written=report.written,
        left_out=report.left_out,
        sha256=hashes,
    )
    provenance.write_manifest(os.path.join(out_dir, "manifest.json"), manifest)
    return report


def _changed(path: str, line: int) -> str:
    return (
        f"{path}:{line}: the input no longer matches the store's last run; run `mlxbatch process` "
        "again, then export"
    )


def report_line(report: DatasetReport) -> str:
    counts = ", ".join(f"{report.written[s]} {s}" for s in SPLITS)
    left = ", ".join(f"{n} {why}" for why, n in sorted(report.left_out.items()))
    return f"wrote {counts} examples ({report.format}) to {report.out_dir}" + (
        f"; left out: {left}" if left else ""
    )
