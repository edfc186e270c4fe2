"""Provenance: what produced an output, kept with the run and published as a manifest file.

`start` gathers what is known once the model has loaded: the model (name, resolved path, the
Hub snapshot revision in that path, the engine's identity hash, a hash of config.json, dtype,
quantisation, adapter path and hash, chat-template hash), the run's settings (its JobSpec, with
the default seed and how per-row seeds are derived), mlxbatch / mlx / mlx-lm versions, and the
input file's path and sha256. `finish` adds row counts and timestamps. The runner stores the
result in the store's run row and writes `<output>.manifest.json` after the output; `export`
writes one beside whatever it writes. `mlxbatch status` prints it.

What it does not do: hash model weights (gigabytes; the engine identity covers their names,
sizes and the config), import mlx (versions come from package metadata), or make a manifest a
source of truth (the store is; a manifest is rewritten by every run and export).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlxbatch import __version__

MANIFEST_VERSION = 1
SEED_RULE = (
    "a sampled row draws from sha256('{seed}:{id}:{sample_index}'); a row's own 'seed' "
    "replaces the default; greedy rows (temperature 0) use no seed"
)


def manifest_path(output: str) -> str:
    return output + ".manifest.json"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(path: str | Path) -> str:
    """One hash over every file under `path` (relative name and content), in name order."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    digest = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        digest.update(f"{p.relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return digest.hexdigest()


def hub_revision(path: str | None) -> str | None:
    """The commit in a Hugging Face cache path (`.../models--org--name/snapshots/<rev>/`)."""
    if not path:
        return None
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and i > 0 and parts[i - 1].startswith("models--"):
            return parts[i + 1]
    return None


def resolve_model_path(model: str, cache_dir: str | None = None) -> str | None:
    """A local model directory, or where the Hub cache holds `model`; None if neither."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", cache_dir=cache_dir)
    except Exception:  # not a repo id, no cache: provenance is best effort here
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def chat_template_sha256(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    if callable(template):  # mlx-lm's built-in templates are Python functions
        text = f"{getattr(template, '__module__', '')}.{getattr(template, '__qualname__', '')}"
    elif isinstance(template, str):
        text = template
    else:
        text = json.dumps(template, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"mlxbatch": __version__}
    for name in ("mlx", "mlx-lm"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    found["platform"] = f"{platform.system()} {platform.machine()}"
    return found


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def model_section(spec: Any, engine: Any) -> dict[str, Any]:
    """What identifies the model that generated: enough to load the very same one again."""
    path = resolve_model_path(spec.model)
    config_file = Path(path, "config.json") if path else None
    config = getattr(engine, "config", {}) or {}
    adapter = None
    if spec.adapter_path:
        adapter = {
            "path": os.path.abspath(spec.adapter_path),
            "sha256": tree_sha256(spec.adapter_path) if os.path.exists(spec.adapter_path) else None,
        }
    return {
        "name": spec.model,
        "path": path,
        "revision": hub_revision(path),
        "identity": engine.identity,
        "config_sha256": (
            file_sha256(config_file) if config_file and config_file.is_file() else None
        ),
        "dtype": engine.dtype,
        "quantization": config.get("quantization"),
        "quantized_at_load": spec.quantize,
        "adapter": adapter,
        "chat_template_sha256": chat_template_sha256(engine.tokenizer),
    }


def _optional_file(path: str | None) -> dict | None:
    if not path:
        return None
    exists = os.path.isfile(path)
    return {"path": os.path.abspath(path), "sha256": file_sha256(path) if exists else None}


def start(spec: Any, engine: Any, kind: str) -> dict[str, Any]:
    """Everything known before generation: model, settings, versions, input hash."""
    now = time.time()
    return {
        "manifest_version": MANIFEST_VERSION,
        "started": _stamp(now),
        "started_unix": now,
        "input": {**(_optional_file(spec.input) or {}), "kind": kind},
        "output": os.path.abspath(spec.output_path),
        "errors": os.path.abspath(spec.errors_path),
        "store": os.path.abspath(spec.store_path),
        "model": model_section(spec, engine),
        "generation": spec.to_dict(),
        "seed": {"default": spec.seed, "per_row": SEED_RULE},
        "schemas": {
            "json_schema": _optional_file(spec.json_schema),
            "input_schema": _optional_file(spec.input_schema),
        },
        "versions": versions(),
    }


def finish(
    static: dict[str, Any], *, run_id: int, status: str, stats: dict, counts: dict
) -> dict[str, Any]:
    """The manifest of a run that ended: `static` plus its status, counts and end time."""
    now = time.time()
    return {
        **static,
        "kind": "run",
        "run_id": run_id,
        "status": status,
        "finished": _stamp(now),
        "finished_unix": now,
        "rows": {**counts, **stats},
    }


def for_export(run: dict, target: str, lines: int, **extra: Any) -> dict[str, Any]:
    """The manifest of an export: the run's own provenance (or what the store knows)."""
    base = run.get("provenance") or {
        "manifest_version": MANIFEST_VERSION,
        "input": {"path": run.get("input"), "kind": run.get("kind")},
        "model": {"name": run.get("model"), "identity": run.get("model_identity")},
        "generation": run.get("spec"),
        "versions": versions(),
        "note": "the run that made these results recorded no provenance (an older mlxbatch)",
    }
    now = time.time()
    return {
        **base,
        "kind": "export",
        "run_id": run.get("run_id"),
        "exported": {
            "path": os.path.abspath(target),
            "at": _stamp(now),
            "at_unix": now,
            "lines": lines,
            **extra,
        },
        "versions": {**base.get("versions", {}), "exported_by": versions()},
    }


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
    """Publish `manifest` as JSON at `path`, atomically (temp file, fsync, rename)."""
    from mlxbatch.jobs.atomic import write_atomic

    text = json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    # Metadata, not output: the MLXBATCH_FAULT sweeps count store and output writes only.
    write_atomic(path, write, faults=False)


def summary_lines(prov: dict[str, Any]) -> list[str]:
    """What `mlxbatch status` prints about a run's provenance."""
    model = prov.get("model") or {}
    where = model.get("path") or model.get("name")
    revision = model.get("revision")
    rev = f"revision {revision}" if revision else "local files"
    quant = model.get("quantization")
    quant_text = (
        f"{quant.get('bits')}-bit, group {quant.get('group_size')}"
        if isinstance(quant, dict)
        else "none"
    )
    lines = [
        f"model files: {where} ({rev}); identity {model.get('identity')}; "
        f"dtype {model.get('dtype')}; quantization {quant_text}",
    ]
    adapter = model.get("adapter")
    if adapter:
        lines.append(f"adapter: {adapter['path']} (sha256 {adapter['sha256']})")
    lines.append(f"chat template: sha256 {model.get('chat_template_sha256')}")
    inp = prov.get("input") or {}
    lines.append(f"input: {inp.get('path')} (sha256 {inp.get('sha256')})")
    seed = prov.get("seed") or {}
    v = prov.get("versions") or {}
    lines.append(
        f"seed: {seed.get('default')}; mlxbatch {v.get('mlxbatch')}, mlx {v.get('mlx')}, "
        f"mlx-lm {v.get('mlx-lm')}"
    )
    return lines
