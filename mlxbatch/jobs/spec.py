"""JobSpec: everything one run needs, merged from defaults, a job file and CLI flags.

Precedence: built-in defaults < job file (`--job`, YAML or JSON) < flags given on the command
line. Relative paths inside a job file are taken relative to the job file. The job file is
checked against `schemas/job.schema.json` before anything else runs. This module does not read
inputs or load models.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from mlxbatch.records import GenParams, InputProblems, Problem
from mlxbatch.schemas import load_schema

DEFAULT_MODEL = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"


@dataclass
class JobSpec:
    input: str = ""
    output: str | None = None
    store: str | None = None
    model: str = DEFAULT_MODEL
    adapter_path: str | None = None
    dtype: str = "auto"
    quantize: int | None = None
    trust_remote_code: bool = False
    input_format: str = "auto"
    template: str | None = None
    system: str | None = None
    chat_template: bool = True
    input_schema: str | None = None
    id_field: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: str | None = None
    choices: list[str] | None = None
    regex: str | None = None
    batch_size: int | None = None
    prefill_batch_size: int | None = None
    prefix_cache: bool = True
    window: int = 10_000
    checkpoint_every: float = 300.0
    fresh: bool = False
    max_errors: int = 0
    quiet: bool = False
    ray: str | None = None  # Ray address ("auto", HOST:PORT): generate on a Ray cluster
    ray_workers: int | None = None  # Ray actors (default: one per machine / GPU / mlx unit)
    executor: str | None = None  # "local" | "ray" (job files); None: Ray when `ray` is set
    ignore_model: bool = False  # run OpenAI lines whose body.model names another model
    deadline: str | None = None  # "HH:MM": stop cleanly (resumably) at its next occurrence

    @property
    def output_path(self) -> str:
        return self.output or default_output(self.input)

    @property
    def store_path(self) -> str:
        return self.store or default_store(self.output_path)

    @property
    def errors_path(self) -> str:
        return errors_path(self.output_path)

    @property
    def ray_address(self) -> str | None:
        """The Ray cluster that generates, or None to generate in this process."""
        if self.executor == "local":
            return None
        if self.executor == "ray" or self.ray:
            return self.ray or "auto"
        return None

    def default_constraint(self) -> dict | None:
        """The job-wide constraint from --json-schema, --choices or --regex."""
        if self.choices:
            return {"type": "choices", "choices": list(self.choices)}
        if self.regex:
            return {"type": "regex", "pattern": self.regex}
        if self.json_schema:
            return {"type": "json_schema", "schema": read_schema_file(self.json_schema)}
        return None

    def default_params(self) -> GenParams:
        return GenParams(
            constraint=self.default_constraint(),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
            n=self.n,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            logprobs=self.logprobs or self.top_logprobs > 0,
            top_logprobs=self.top_logprobs,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_schema_file(path: str) -> dict:
    """A JSON schema from a file the user named; an unreadable one is an input problem."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputProblems([Problem(path, None, f"cannot read schema: {e}")]) from None


def default_output(input_path: str) -> str:
    base = input_path
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
    return base + ".out.jsonl"


def default_store(output_path: str) -> str:
    return output_path + ".mlxbatch.sqlite"


def errors_path(output_path: str) -> str:
    return output_path + ".errors.jsonl"


SPEC_FIELDS = {f.name for f in dataclasses.fields(JobSpec)}


def load_job_file(path: str) -> dict[str, Any]:
    """Parse and validate a job file; raise InputProblems listing everything wrong with it."""
    import jsonschema
    import yaml

    if not os.path.isfile(path):
        raise InputProblems([Problem(path, None, "no such job file")])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        line = line + 1 if line is not None else getattr(e, "lineno", None)
        raise InputProblems([Problem(path, line, f"not valid YAML/JSON: {e}")]) from None
    data = {} if data is None else data
    validator = jsonschema.Draft202012Validator(load_schema("job"))
    problems = [
        Problem(path, None, e.message, e.json_path)
        for e in sorted(validator.iter_errors(data), key=lambda e: e.json_path)
    ]
    if problems:
        raise InputProblems(problems)
    return _resolve_paths(data, os.path.dirname(os.path.abspath(path)))


PATH_FIELDS = ("input", "output", "store", "input_schema", "adapter_path", "json_schema")


def _resolve_paths(data: dict[str, Any], base: str) -> dict[str, Any]:
    """Relative paths in a job file are relative to the job file, so cron can run it anywhere."""
    resolved = dict(data)
    for key in PATH_FIELDS:
        if isinstance(resolved.get(key), str) and not os.path.isabs(resolved[key]):
            resolved[key] = os.path.normpath(os.path.join(base, resolved[key]))
    model = resolved.get("model")
    if isinstance(model, str) and not os.path.isabs(model):
        local = os.path.join(base, model)
        if os.path.isdir(local):
            resolved["model"] = os.path.normpath(local)
    return resolved


def build_spec(job_values: dict[str, Any], cli_values: dict[str, Any]) -> JobSpec:
    """Defaults, then the job file, then flags given on the command line."""
    merged = {**job_values, **{k: v for k, v in cli_values.items() if k in SPEC_FIELDS}}
    if isinstance(merged.get("stop"), str):
        merged["stop"] = [merged["stop"]]
    if "stop" in merged:
        merged["stop"] = list(merged["stop"])
    if isinstance(merged.get("choices"), str):
        merged["choices"] = [c.strip() for c in merged["choices"].split(",") if c.strip()]
    return JobSpec(**merged)
