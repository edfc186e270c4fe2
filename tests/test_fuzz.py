"""Fuzz read + validate: random bytes and random JSON never crash the input check.

The only exception `check_inputs` may raise is the documented InputProblems; and whatever it
accepts can be written back out as UTF-8 JSON (ids, prompts, messages), since outputs carry it.
Bounded by max_examples so the whole file runs in well under 20 s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxbatch.jobs.inputs import check_inputs, iter_requests
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.records import InputProblems

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same examples every run: CI failures reproduce
)

# How a file may be read: (suffix, extra JobSpec fields).
MODES = [
    (".jsonl", {}),
    (".jsonl", {"input_format": "openai"}),
    (".jsonl", {"input_format": "messages"}),
    (".jsonl", {"template": "Review: {{ text }} ({{ stars }})"}),
    (".jsonl.gz", {}),
    (".parquet", {"template": "{{ text }}"}),
]

# Text may hold lone surrogates and floats may be NaN / Infinity: json.dumps writes both, and
# neither is valid JSON text, so the reader must refuse them.
lone_surrogate = st.integers(0xD800, 0xDFFF).map(chr)  # st.characters() never draws one
json_text = st.lists(st.characters() | lone_surrogate, max_size=12).map("".join)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
KEYS = [
    "prompt",
    "messages",
    "id",
    "custom_id",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "metadata",
    "method",
    "url",
    "body",
    "text",
    "stars",
    "role",
    "content",
    "type",
]
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant", "robot", ""]) | json_values,
        "content": st.text(max_size=10)
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)}))
        | json_values,
    },
)
# Rows shaped like the real ones, with the wrong types mixed in, to reach past the first check.
rowish = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=6),
    json_values
    | st.lists(message, max_size=3)
    | st.sampled_from(["POST", "GET", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
    | st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=2)},
        optional={"prompt": json_values, "max_tokens": json_values, "n": json_values},
    ),
    max_size=6,
)
# Rows that are nearly right (good parameters, at most one hostile value), so that many files
# pass and what passes gets checked.
number = (
    st.integers(-(2**64), 2**64) | st.floats() | st.sampled_from([math.nan, math.inf, -math.inf])
)
good_params = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.1, 1),
        "seed": st.integers(0, 2**32),
        "n": st.integers(1, 3),
        "stop": json_text.filter(bool),
    },
)
hostile = st.tuples(
    st.sampled_from(["max_tokens", "temperature", "top_p", "seed", "n", "stop", "id", "custom_id"]),
    st.sampled_from([math.nan, math.inf, -math.inf]) | number | json_text,
)
chat = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": json_text}
    ),
    min_size=1,
    max_size=2,
)


@st.composite
def valid_ish(draw) -> dict:
    row = draw(
        st.fixed_dictionaries({"prompt": json_text}) | st.fixed_dictionaries({"messages": chat})
    )
    row.update(draw(good_params))
    if draw(st.booleans()):
        key, value = draw(hostile)
        row[key] = value
    return row


fragments = st.sampled_from(
    [
        b"\\ud800",
        b"\\udfff\\ud800",
        b"NaN",
        b"-Infinity",
        b"\xef\xbb\xbf",
        b"\x00",
        b"\xff\xfe",
        b"\r",
        b"9" * 5000,
        b"[" * 3000,
        b'{"a":' * 1500,
        b"\xc3",
        b"\\u0000",
    ]
)


@st.composite
def line_bytes(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=60))
    value = draw(rowish if kind in (1, 2) else json_values)
    raw = json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == 2 and raw:  # splice in a troublesome fragment
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(fragments) + raw[at:]
    return raw


@st.composite
def file_bytes(draw) -> bytes:
    lines = draw(st.lists(line_bytes(), max_size=8))
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = ending.join(lines) + draw(st.sampled_from([b"", ending]))
    if draw(st.booleans()):
        data = draw(fragments) + data
    return data


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def assert_writable(spec: JobSpec, kind: str) -> None:
    """Whatever is accepted is strict JSON and UTF-8 again, as the output will need."""
    for request in iter_requests(spec, kind):
        assert isinstance(request.id, (str, int)) and not isinstance(request.id, bool)
        values = [request.id, request.custom_id, request.prompt, request.messages, request.fields]
        json.dumps(
            [*values, dataclasses.asdict(request.params)], ensure_ascii=False, allow_nan=False
        ).encode("utf-8")


def check(path: Path, extra: dict) -> None:
    spec = JobSpec(input=str(path), **extra)
    try:
        result = check_inputs(spec)
    except InputProblems as e:
        assert e.problems and e.total >= len(e.problems)
        for p in e.problems:
            assert p.file in (str(path), spec.template) and (p.line is None or p.line >= 1), p
            str(p).encode("utf-8")  # every message prints
        return
    assert result.requests >= 0
    assert_writable(spec, result.kind)


@FUZZ
@given(data=file_bytes(), mode=st.sampled_from(MODES))
def test_random_bytes_only_raise_input_problems(work, data, mode):
    import gzip

    suffix, extra = mode
    path = work / f"in{suffix}"
    if suffix == ".jsonl.gz":
        data = gzip.compress(data, mtime=0)[: len(data) or None]  # sometimes cut short
    path.write_bytes(data)
    check(path, extra)


@FUZZ
@given(rows=st.lists(rowish | json_values, max_size=8), mode=st.sampled_from(MODES[:4]))
def test_random_json_rows_only_raise_input_problems(work, rows, mode):
    suffix, extra = mode
    path = work / f"rows{suffix}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    check(path, extra)


@FUZZ
@given(rows=st.lists(valid_ish(), min_size=1, max_size=3), template=st.booleans())
def test_nearly_valid_rows_pass_only_when_writable(work, rows, template):
    path = work / "nearly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="ascii")
    check(path, {"template": "{{ prompt }}"} if template else {})


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "text": st.one_of(
                    st.text(max_size=10),
                    st.none(),
                    st.integers(-(2**63), 2**63 - 1),
                    st.lists(st.integers(0, 9), max_size=2),
                )
            },
            optional={
                "stars": st.one_of(
                    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.none()
                )
            },
        ),
        min_size=1,
        max_size=6,
    )
)
def test_random_parquet_rows_only_raise_input_problems(work, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work / "rows.parquet"
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return  # mixed column types that Arrow itself refuses
    pq.write_table(table, path)
    check(path, {"template": "Review: {{ text }} ({{ stars }})"})
