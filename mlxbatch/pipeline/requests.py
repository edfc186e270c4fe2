"""A checked row to a Request: its id, generation parameters and messages.

The fields a row may carry are named here. A field mlxbatch does not know becomes the
Request's `error` (`unsupported_parameter`), so the row turns into an error record and the
run goes on. Rows reach this module already checked against their schema (validate.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mlxbatch.pipeline import openai_body
from mlxbatch.records import MESSAGES, OPENAI, PROMPT, TEMPLATE, GenParams, Request

if TYPE_CHECKING:
    from mlxbatch.pipeline.validate import ValidationContext

PARAM_FIELDS: tuple[str, ...] = ("max_tokens", "temperature", "top_p", "seed", "stop", "n")
PARAM_FIELDS += ("top_k", "min_p")
PARAM_FIELDS += ("repetition_penalty", "logprobs", "top_logprobs")
CONSTRAINT_FIELDS = ("response_format", "choices", "regex")
ID_FIELDS = ("custom_id", "id")
ROW_FIELDS = {"prompt", "messages", "metadata", "max_completion_tokens", *PARAM_FIELDS, *ID_FIELDS}
ROW_FIELDS |= set(CONSTRAINT_FIELDS)
OPENAI_BODY_FIELDS = {"model", "messages", "prompt", "user", "max_completion_tokens", *PARAM_FIELDS}
OPENAI_BODY_FIELDS |= {"response_format", "logit_bias"}
ROW_FIELDS |= {"logit_bias"}
OPENAI_URLS = {"/v1/chat/completions": MESSAGES, "/v1/completions": PROMPT}


_ALL_PARAM_FIELDS = frozenset(
    (*PARAM_FIELDS, *CONSTRAINT_FIELDS, "max_completion_tokens", "logit_bias")
)


def _params(source: dict, defaults: GenParams, ctx: ValidationContext) -> GenParams:
    if _ALL_PARAM_FIELDS.isdisjoint(source):
        return defaults  # most rows: nothing to override, no copy
    values: dict[str, Any] = {k: source[k] for k in PARAM_FIELDS if k in source}
    if ctx.read_constraint is not None and any(k in source for k in CONSTRAINT_FIELDS):
        values["constraint"] = ctx.read_constraint(source)
    if "max_completion_tokens" in source:
        values["max_tokens"] = source["max_completion_tokens"]
    if "logit_bias" in source:
        values["logit_bias"] = tuple(
            sorted((int(k), float(v)) for k, v in source["logit_bias"].items())
        )
    if values.get("top_logprobs"):
        values["logprobs"] = True
    if isinstance(values.get("stop"), str):
        values["stop"] = (values["stop"],)
    elif "stop" in values:
        values["stop"] = tuple(values["stop"])
    return replace(defaults, **values)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def _messages(raw: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": _text(m["content"])} for m in raw]


def _row_id(data: dict, line: int, ctx: ValidationContext) -> tuple[Any, str | None]:
    if ctx.id_field and data.get(ctx.id_field) is not None:
        return data[ctx.id_field], None
    if data.get("custom_id") is not None:
        return data["custom_id"], str(data["custom_id"])
    if data.get("id") is not None:
        return data["id"], None
    return line, None


def _unknown(keys: Iterable[str], allowed: set[str]) -> tuple[str, str] | None:
    extra = [k for k in keys if k not in allowed]
    if not extra:
        return None
    extra.sort()
    return ("unsupported_parameter", f"unsupported parameter(s): {', '.join(extra)}")


def to_request(kind: str, data: dict, line: int, ctx: ValidationContext) -> Request:
    """The Request for one checked row of `kind`."""
    if kind == OPENAI:
        row_kind = OPENAI_URLS[data["url"]]
        body = openai_body.legacy_logprobs(
            openai_body.without_nulls(data)["body"], row_kind == PROMPT
        )
        text, ids, prompt_error = (
            openai_body.prompt(body["prompt"]) if row_kind == PROMPT else (None, None, None)
        )
        return Request(
            line=line,
            id=data["custom_id"],
            custom_id=data["custom_id"],
            kind=OPENAI,
            params=_params(body, ctx.defaults, ctx),
            url=data["url"],
            prompt=text,
            prompt_ids=ids,
            messages=_messages(body["messages"]) if row_kind == MESSAGES else None,
            error=openai_body.model_mismatch(body, ctx.model_names)
            or openai_body.unsupported(body, OPENAI_BODY_FIELDS)
            or prompt_error,
        )
    row_id, custom_id = _row_id(data, line, ctx)
    if kind == TEMPLATE:
        return Request(
            line=line,
            id=row_id,
            custom_id=custom_id,
            kind=TEMPLATE,
            params=ctx.defaults,
            fields=data,
        )
    allowed = ROW_FIELDS | ({ctx.id_field} if ctx.id_field else set())
    return Request(
        line=line,
        id=row_id,
        custom_id=custom_id,
        kind=kind,
        params=_params(data, ctx.defaults, ctx),
        prompt=data.get("prompt") if kind == PROMPT else None,
        messages=_messages(data["messages"]) if kind == MESSAGES else None,
        error=_unknown(data, allowed),
    )
