"""Plain records that flow between the pipeline stages.

Every stage is a function over these dataclasses, so each can be tested with a list literal.
This module holds data only: no I/O, no model, no validation logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Row kinds, detected per file (see pipeline/validate.py).
PROMPT, MESSAGES, OPENAI, TEMPLATE = "prompt", "messages", "openai", "template"


@dataclass(frozen=True)
class Problem:
    """One input problem, printed as `file:line: message (at $.path)`."""

    file: str
    line: int | None
    message: str
    path: str = "$"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        at = f" (at {self.path})" if self.path and self.path != "$" else ""
        return f"{where}: {self.message}{at}"


class InputProblems(Exception):
    """Raised before the model loads when the input has problems; carries all of them."""

    def __init__(self, problems: list[Problem], total: int | None = None):
        super().__init__(f"{total or len(problems)} input problem(s)")
        self.problems = problems
        self.total = total if total is not None else len(problems)


@dataclass
class SourceRow:
    """A row as read from the file: its 1-based line (JSONL) or row number (Parquet)."""

    line: int
    data: Any = None
    error: str | None = None  # set when the line could not be parsed


@dataclass(frozen=True)
class GenParams:
    """Generation parameters of one request, after job defaults and row overrides."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    n: int = 1
    constraint: dict | None = None  # see pipeline/constrain.py
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Request:
    """A validated row: what to generate and how, before tokenization."""

    line: int
    id: Any
    kind: str
    params: GenParams
    custom_id: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None  # an OpenAI /v1/completions prompt given as token ids
    fields: dict | None = None  # the row itself, for template rows
    url: str | None = None  # OpenAI envelope url
    error: tuple[str, str] | None = None  # (code, message): a per-row error known before generation


@dataclass
class Task:
    """One sample of one request, tokenized and keyed: the unit the engine generates."""

    key: str
    seq: int  # position in the output
    line: int
    id: Any
    sample_index: int
    prompt_ids: list[int]  # empty when `done`: the prompt was not rendered again
    params: GenParams
    custom_id: str | None = None
    url: str | None = None
    error: tuple[str, str] | None = None
    done: bool = False  # known, before rendering, to have a stored result
    digest: bytes | None = None  # its request's digest (pipeline/render.request_digest)


@dataclass
class PrefixGroup:
    """Tasks whose prompts start with the same `prefix` token ids, prefilled once for all."""

    prefix: list[int]
    tasks: list[Task]


@dataclass
class Result:
    """What generation produced for one task (or why it failed)."""

    key: str
    text: str = ""
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_code: str | None = None
    error_message: str | None = None
    created: int = 0
    extra: dict = field(default_factory=dict)
