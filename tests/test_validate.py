"""Unit tests of pipeline/validate.py over list literals."""

from __future__ import annotations

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxbatch.pipeline.validate import (
    ValidationContext,
    _plainly_valid,
    _validators,
    detect_kind,
    validate_rows,
)
from mlxbatch.records import MESSAGES, OPENAI, PROMPT, TEMPLATE, GenParams, SourceRow

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2000),
    st.floats(-1, 12, allow_nan=False),
    st.text(max_size=3),
    st.lists(st.text(max_size=2), max_size=3),
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "robot", 3, ["user"]]),
            "content": st.one_of(st.text(max_size=3), st.integers()),
        }
    ),
    max_size=2,
)
rows = st.dictionaries(
    st.sampled_from(
        [
            "prompt",
            "messages",
            "id",
            "custom_id",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "n",
            "other",
        ]
    ),
    st.one_of(values, messages),
    max_size=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows, st.sampled_from([PROMPT, MESSAGES, TEMPLATE]))
def test_fast_accept_never_accepts_what_the_schema_rejects(row, kind):
    if _plainly_valid(kind, row):
        assert list(_validators(None).by_kind[kind].iter_errors(row)) == []


def test_detect_kind():
    envelope = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}
    assert detect_kind(envelope, "auto", False) == OPENAI
    assert detect_kind({"prompt": "x"}, "auto", False) == PROMPT
    assert detect_kind({"text": "x"}, "auto", True) == TEMPLATE
    assert detect_kind(envelope, "rows", True) == TEMPLATE


def test_requests_carry_params_ids_and_unknown_fields():
    ctx = ValidationContext(
        file="f.jsonl", kind=PROMPT, defaults=GenParams(max_tokens=9, stop=("x",))
    )
    source = [
        SourceRow(1, {"prompt": "a", "max_completion_tokens": 3, "stop": "END"}),
        SourceRow(
            2,
            {
                "id": 7,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}],
                    }
                ],
            },
        ),
        SourceRow(3, {"custom_id": "c", "prompt": "b", "colour": "red"}),
    ]
    got = list(validate_rows(source, ctx))
    assert [(r.id, r.custom_id, r.kind) for r in got] == [
        (1, None, PROMPT),
        (7, None, MESSAGES),
        ("c", "c", PROMPT),
    ]
    assert got[0].params == GenParams(max_tokens=3, stop=("END",))
    assert got[1].messages == [{"role": "user", "content": "hi!"}]
    assert got[2].error == ("unsupported_parameter", "unsupported parameter(s): colour")
    assert ctx.problems == []


def test_user_schema_errors_come_with_paths():
    schema = {"type": "object", "properties": {"text": {"type": "string"}}}
    ctx = ValidationContext(file="f", kind=TEMPLATE, defaults=GenParams(), user_schema=schema)
    assert list(validate_rows([SourceRow(4, {"text": 1})], ctx)) == []
    assert [str(p) for p in ctx.problems] == ["f:4: 1 is not of type 'string' (at $.text)"]


def test_inlined_schemas_match_the_shipped_schema():
    from mlxbatch.schemas import load_schema

    full = jsonschema.Draft202012Validator(load_schema("record"))
    fast = _validators(None).by_kind
    for row, kind in [
        ({"prompt": "a", "n": 0}, PROMPT),
        ({"messages": [{"role": "x", "content": "a"}]}, MESSAGES),
    ]:
        assert bool(list(full.iter_errors(row))) == bool(list(fast[kind].iter_errors(row)))
