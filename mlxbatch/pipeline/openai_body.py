"""The OpenAI Batch API's request bodies, read as the API reads them.

For /v1/chat/completions and /v1/completions lines: a null field means "not given"; tags,
storage and routing fields (`user`, `metadata`, `store`, `service_tier`) are accepted and
ignored; fields mlxbatch cannot honour are accepted only at the value that changes nothing
(`stream: false`, `frequency_penalty: 0`, `echo: false`, `best_of` = n, ...), otherwise the
row is an error record naming them (`unsupported_parameter`); a /v1/completions `prompt` may
be a string, a list of one string, token ids, or one list of token ids (several prompts in one
line is an error record), and its legacy integer `logprobs: N` means N alternatives per token;
`body.model` naming another model than the loaded one is an error record (`model_mismatch`)
unless the job ignores it. Schema checks are in schemas/record.schema.json and validate.py;
nothing here renders or generates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Fields that change nothing here (tags, storage, routing): accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier"})


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


# Fields accepted at a value that changes nothing: name -> (what is supported, check).
NEUTRAL: dict[str, tuple[str, Callable[[Any, dict], bool]]] = {
    "stream": ("only false", lambda v, body: v is False),
    "frequency_penalty": ("only 0", lambda v, body: _is_zero(v)),
    "presence_penalty": ("only 0", lambda v, body: _is_zero(v)),
    "echo": ("only false", lambda v, body: v is False),
    "best_of": ("only equal to n", lambda v, body: _is_int(v) and v == body.get("n", 1)),
    "suffix": ("only empty", lambda v, body: v == ""),
    "parallel_tool_calls": ("without tools", lambda v, body: isinstance(v, bool)),
}


def without_nulls(data: dict) -> dict:
    """An envelope with its body's null fields dropped: OpenAI reads null as "not given"."""
    body = data.get("body")
    if not isinstance(body, dict) or all(v is not None for v in body.values()):
        return data
    return {**data, "body": {k: v for k, v in body.items() if v is not None}}


def unsupported(body: dict, allowed: set[str]) -> tuple[str, str] | None:
    """The unsupported_parameter error naming every field this body asks for in vain."""
    extra = []
    for key in sorted(body):
        if key in allowed or key in IGNORED:
            continue
        hint, neutral = NEUTRAL.get(key, ("", None))
        if neutral is not None and neutral(body[key], body):
            continue
        extra.append(f"{key} ({hint} is supported)" if hint else key)
    if not extra:
        return None
    return ("unsupported_parameter", f"unsupported parameter(s): {', '.join(extra)}")


def model_mismatch(body: dict, names: frozenset[str] | None) -> tuple[str, str] | None:
    """The model_mismatch error when body.model is not one of `names` (None: any model)."""
    model = body.get("model")
    if names is None or model is None or model in names:
        return None
    loaded = max(names, key=len, default="")
    return (
        "model_mismatch",
        f"body.model {model!r} is not the loaded model {loaded!r}; pass --ignore-model "
        "to run it with the loaded model anyway",
    )


def prompt(value: Any) -> tuple[str | None, list[int] | None, tuple[str, str] | None]:
    """A /v1/completions prompt in any of OpenAI's forms: (text, token ids, error)."""
    if isinstance(value, str):
        return value, None, None
    if all(_is_int(t) for t in value):
        return None, list(value), None
    if len(value) == 1:
        first = value[0]
        return (first, None, None) if isinstance(first, str) else (None, list(first), None)
    many = f"prompt is a list of {len(value)} prompts; send one request line per prompt"
    return None, None, ("unsupported_parameter", many)


def legacy_logprobs(body: dict, completions: bool) -> dict:
    """A /v1/completions body's `logprobs: N` read as logprobs with N top alternatives."""
    value = body.get("logprobs")
    if completions and _is_int(value):
        return {**body, "logprobs": True, "top_logprobs": value}
    return body
