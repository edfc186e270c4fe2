"""Bad input is rejected before any model loads, with every problem as `file:line: message`.

The corpus lives in tests/data/bad/ (every file there must be rejected; tests/data/bad/accepted/
holds look-alikes that must pass). Each case runs the real `mlxbatch process` with a model loader
that fails the test if it is ever called, and asserts the exact stderr, exit code 1 (2 for usage
errors), and that nothing was written: no output, no errors file, no store, no lock.

The end of this file holds the security checks: sandboxed templates, trust_remote_code off by
default, and row values never used as paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from tests.conftest import read_jsonl, write_jsonl

BAD = Path(__file__).parent / "data" / "bad"
ACCEPTED = BAD / "accepted"

MESSAGES_ROLE = "'robot' is not one of ['system', 'developer', 'user', 'assistant', 'tool'] (at $.messages[0].role)"
NO_PROMPT = "row has neither 'prompt' nor 'messages' (pass --template to render other rows)"

# file -> [(line or None, message)], in the order they are reported.
EXPECTED: dict[str, list[tuple[int | None, str]]] = {
    "malformed_json.jsonl": [
        (2, "malformed JSON: Expecting property name enclosed in double quotes at column 29"),
        (3, "malformed JSON: Expecting property name enclosed in double quotes at column 2"),
    ],
    "truncated_last_line.jsonl": [
        (
            2,
            "malformed JSON: Unterminated string starting at column 12 "
            "(the file ends inside this line: truncated?)",
        ),
    ],
    "utf8_bom.jsonl": [(1, "file starts with a UTF-8 byte order mark (BOM)")],
    "invalid_utf8.jsonl": [(2, "invalid UTF-8 at byte 16"), (3, "invalid UTF-8 at byte 13")],
    "nul_bytes.jsonl": [(2, "NUL byte at column 14"), (3, "NUL byte at column 1")],
    "non_object_lines.jsonl": [
        (1, "expected a JSON object, got array"),
        (2, "expected a JSON object, got number"),
        (3, "expected a JSON object, got null"),
        (4, "expected a JSON object, got string"),
        (5, "expected a JSON object, got boolean"),
    ],
    "missing_prompt.jsonl": [(2, NO_PROMPT), (3, NO_PROMPT), (4, NO_PROMPT)],
    "bad_messages.jsonl": [
        (1, MESSAGES_ROLE),
        (2, "42 is not of type 'string' (at $.messages[0].content)"),
        (3, "None is not of type 'string' (at $.messages[0].content)"),
        (4, "'content' is a required property (at $.messages[0])"),
        (5, "'hello' is not of type 'array' (at $.messages)"),
        (
            6,
            "[{'type': 'image_url', 'image_url': 'x'}] is not of type 'string' (at $.messages[0].content)",
        ),
    ],
    "duplicate_ids.jsonl": [
        (3, "duplicate id 'a' (first at line 1) (at $.id)"),
        (5, "duplicate id 'c' (first at line 4) (at $.custom_id)"),
        (7, "duplicate id '7' (first at line 6) (at $.id)"),
    ],
    "openai_bad_envelope.jsonl": [
        (
            2,
            "'/v1/embeddings' is not one of ['/v1/chat/completions', '/v1/completions'] (at $.url)",
        ),
        (3, "'POST' was expected (at $.method)"),
        (4, "'POST' was expected (at $.method)"),
        (4, "'/v1/responses' is not one of ['/v1/chat/completions', '/v1/completions'] (at $.url)"),
        (5, "'custom_id' is a required property"),
    ],
    "nan_infinity.jsonl": [
        (2, "malformed JSON: NaN is not valid JSON"),
        (3, "malformed JSON: Infinity is not valid JSON"),
        (4, "malformed JSON: -Infinity is not valid JSON"),
    ],
    "unpaired_surrogate.jsonl": [
        (2, "malformed JSON: unpaired surrogate \\ud800 in a string (not Unicode)"),
        (3, "malformed JSON: unpaired surrogate \\udc00 in a string (not Unicode)"),
    ],
    "huge_integer.jsonl": [
        (2, "malformed JSON: Exceeds the limit (4300 digits) for integer string conversion"),
    ],
    "not_gzip.jsonl.gz": [(1, "not valid gzip data: Not a gzipped file (b'{\"')")],
    "truncated.jsonl.gz": [(93, "gzip data ends early: the file is truncated")],
    "not_parquet.parquet": [
        (
            1,
            "not a readable Parquet file: Parquet magic bytes not found in footer. "
            "Either the file is corrupted or this is not a parquet file.",
        ),
    ],
}


class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if `process` ever gets as far as loading a model."""
    import mlxbatch.pipeline.engine as engine

    def refuse(*args, **kwargs):
        raise ModelLoaded("the model was loaded for a bad input")

    monkeypatch.setattr(engine, "Engine", refuse)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def expected_stderr(path: Path | str, problems: list[tuple[int | None, str]]) -> str:
    lines = [
        f"{path}:{line}: {msg}" if line is not None else f"{path}: {msg}" for line, msg in problems
    ]
    return "\n".join(lines) + f"\nError: {len(problems)} input problem(s); nothing was generated\n"


def assert_rejected(tmp_path: Path, inp: Path, stderr: str, *extra: str) -> None:
    """`process` exits 1 with exactly `stderr` and writes nothing; `validate` says the same."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = tree(tmp_path)
    result = invoke(
        "process", str(inp), "-o", str(out_dir / "o.jsonl"), "-m", str(tmp_path / "m"), *extra
    )
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", stderr)
    assert tree(tmp_path) == before  # no output, errors file, store, WAL or lock
    result = invoke("validate", str(inp), *extra)
    assert (result.exit_code, result.stderr) == (1, stderr)


def test_every_corpus_file_has_expectations():
    files = sorted(p.name for p in BAD.iterdir() if p.is_file())
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_is_rejected_before_the_model_loads(tmp_path, no_model, name):
    inp = tmp_path / name
    shutil.copy(BAD / name, inp)
    assert_rejected(tmp_path, inp, expected_stderr(inp, EXPECTED[name]))


def test_not_parquet_with_a_template(tmp_path, no_model):
    inp = tmp_path / "x.parquet"
    shutil.copy(BAD / "not_parquet.parquet", inp)
    assert_rejected(
        tmp_path,
        inp,
        expected_stderr(inp, EXPECTED["not_parquet.parquet"]),
        "--template",
        "{{ text }}",
    )


@pytest.mark.parametrize(
    "name, rows",
    [("crlf.jsonl", 3), ("empty_lines.jsonl", 2), ("empty.jsonl", 0)],
)
def test_look_alikes_are_accepted(name, rows):
    result = invoke("validate", str(ACCEPTED / name))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{ACCEPTED / name}: {rows} rows OK (prompt rows, {rows} tasks)\n"


def test_crlf_and_blank_lines_process_like_plain_lines(tmp_path, tiny_model):
    plain = write_jsonl(
        tmp_path / "plain.jsonl",
        [
            {"prompt": "one"},
            {"prompt": "two"},
            {"messages": [{"role": "user", "content": "three"}]},
        ],
    )
    crlf = tmp_path / "crlf.jsonl"
    shutil.copy(ACCEPTED / "crlf.jsonl", crlf)
    for f in (plain, crlf):
        assert invoke("process", str(f), "-m", tiny_model, "--max-tokens", "3", "-q").exit_code == 0
    assert (tmp_path / "crlf.out.jsonl").read_bytes() == (tmp_path / "plain.out.jsonl").read_bytes()
    blank = tmp_path / "blank.jsonl"
    shutil.copy(ACCEPTED / "empty_lines.jsonl", blank)
    assert invoke("process", str(blank), "-m", tiny_model, "--max-tokens", "3", "-q").exit_code == 0
    # Blank lines are skipped, but ids still count file lines.
    assert [r["id"] for r in read_jsonl(tmp_path / "blank.out.jsonl")] == [3, 6]


def test_empty_file_gives_empty_output(tmp_path, tiny_model):
    f = tmp_path / "empty.jsonl"
    shutil.copy(ACCEPTED / "empty.jsonl", f)
    result = invoke("process", str(f), "-m", tiny_model, "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "empty.out.jsonl").read_bytes() == b""
    assert not (tmp_path / "empty.out.jsonl.errors.jsonl").exists()


# -- a 10 MB line: a valid one is accepted; a broken one is reported like any other line -------


def ten_mb_prompt() -> str:
    return ("the cat sat on a mat " * 500_000)[: 10 * 2**20]


def test_ten_megabyte_line(tmp_path, no_model):
    good = tmp_path / "big.jsonl"
    good.write_text(
        json.dumps({"id": "big", "prompt": ten_mb_prompt()})
        + "\n"
        + '{"id": "small", "prompt": "hi"}\n'
    )
    assert good.stat().st_size > 10 * 2**20
    result = invoke("validate", str(good))
    assert (result.exit_code, result.stdout) == (0, f"{good}: 2 rows OK (prompt rows, 2 tasks)\n")
    bad = tmp_path / "cut.jsonl"
    bad.write_text('{"prompt": "hi"}\n' + json.dumps({"prompt": ten_mb_prompt()})[:-2])
    stderr = expected_stderr(
        bad,
        [
            (
                2,
                "malformed JSON: Unterminated string starting at column 12 (the file ends inside this line: truncated?)",
            )
        ],
    )
    assert_rejected(tmp_path, bad, stderr)


@pytest.mark.slow
def test_ten_megabyte_prompt_becomes_a_context_error_record(tmp_path, tiny_model):
    f = tmp_path / "big.jsonl"
    f.write_text(
        json.dumps({"id": "big", "prompt": ten_mb_prompt()})
        + "\n"
        + '{"id": "small", "prompt": "hi"}\n'
    )
    result = invoke(
        "process", str(f), "-m", tiny_model, "--max-tokens", "3", "-q", "--max-errors", "1"
    )
    assert result.exit_code == 0, result.output
    big, small = read_jsonl(tmp_path / "big.out.jsonl")
    assert big["id"] == "big" and big["error"]["code"] == "context_length_exceeded"
    assert small["error"] is None


# -- Parquet: the template's column missing, null, or nested -----------------------------------


@pytest.mark.parametrize(
    "table, problems",
    [
        (
            pa.table({"body": ["a", "b"]}),
            [(None, "column(s) 'text' used by the template are missing")],
        ),
        (
            pa.table({"text": ["a", None, "c", None]}),
            [
                (2, "field 'text' used by the template is null (at $.text)"),
                (4, "field 'text' used by the template is null (at $.text)"),
            ],
        ),
        (
            pa.table({"text": [{"a": 1}, {"a": 2}]}),
            [
                (
                    1,
                    "field 'text' used by the template is a nested object; templates take strings and numbers (at $.text)",
                ),
                (
                    2,
                    "field 'text' used by the template is a nested object; templates take strings and numbers (at $.text)",
                ),
            ],
        ),
        (
            pa.table({"text": [["a"], ["b", "c"]]}),
            [
                (
                    1,
                    "field 'text' used by the template is a nested array; templates take strings and numbers (at $.text)",
                ),
                (
                    2,
                    "field 'text' used by the template is a nested array; templates take strings and numbers (at $.text)",
                ),
            ],
        ),
    ],
    ids=["missing-column", "nulls", "struct", "list"],
)
def test_parquet_template_column_problems(tmp_path, no_model, table, problems):
    inp = tmp_path / "rows.parquet"
    pq.write_table(table, inp)
    assert_rejected(
        tmp_path, inp, expected_stderr(inp, problems), "--template", "Review: {{ text }}"
    )


@pytest.mark.parametrize("offset", [4, 40], ids=["page-header", "page-data"])
def test_parquet_damaged_inside(tmp_path, no_model, offset):
    """A sound footer over a damaged page: found while reading, reported as one line, no traceback."""
    inp = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", "gamma"] * 100}), inp, compression="snappy")
    data = bytearray(inp.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    inp.write_bytes(bytes(data))
    for extra in ([], ["--template", "{{ text }}"]):
        result = invoke(
            "process", str(inp), "-o", str(tmp_path / "o.jsonl"), "-m", str(tmp_path / "m"), *extra
        )
        assert result.exit_code == 1
        assert re.fullmatch(
            re.escape(f"{inp}:1: not a readable Parquet file: ")
            + r"\S[^\n]*\n"
            + re.escape("Error: 1 input problem(s); nothing was generated\n"),
            result.stderr,
        ), result.stderr
    assert sorted(os.listdir(tmp_path)) == ["rows.parquet"]


# -- paths: a directory or missing file as input, an output in a missing directory -------------


def test_directory_or_missing_input(tmp_path, no_model):
    d = tmp_path / "adir"
    d.mkdir()
    assert_rejected(tmp_path, d, expected_stderr(d, [(None, "is a directory, not an input file")]))
    missing = tmp_path / "missing.jsonl"
    assert_rejected(tmp_path, missing, expected_stderr(missing, [(None, "no such file")]))


def test_output_in_a_missing_directory(tmp_path, no_model):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    before = tree(tmp_path)
    out = tmp_path / "nope" / "deeper" / "o.jsonl"
    result = invoke("process", str(inp), "-o", str(out), "-m", str(tmp_path / "m"))
    assert result.exit_code == 1
    assert result.stderr == expected_stderr(
        out, [(None, f"output directory {out.parent} does not exist")]
    )
    assert tree(tmp_path) == before


def test_unreadable_input_schema(tmp_path, no_model):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    schema = tmp_path / "schema.json"
    schema.write_text("{not json")
    stderr = expected_stderr(
        schema,
        [
            (
                None,
                "cannot read schema: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
            )
        ],
    )
    assert_rejected(tmp_path, inp, stderr, "--input-schema", str(schema))


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Error: missing INPUT (give it as an argument or as 'input' in --job)"),
        (["{inp}", "--input-format", "rows"], "Error: --input-format rows needs --template"),
        (
            ["{inp}", "--max-tokens", "0"],
            "Error: Invalid value for '--max-tokens': 0 is not in the range x>=1.",
        ),
        # (Click words this one differently across versions; the option is what must be named.)
        (
            ["{inp}", "--temprature", "1"],
            re.compile(r"Error: No such option:? '?--temprature'?.*--temperature.*"),
        ),
        (
            ["{inp}", "--input-format", "csv"],
            "Error: Invalid value for '--input-format': 'csv' is not one of 'auto', 'prompt', 'messages', 'openai', 'rows'.",
        ),
    ],
    ids=["no-input", "rows-without-template", "bad-value", "unknown-option", "bad-choice"],
)
def test_usage_errors_exit_2(tmp_path, no_model, args, message):
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    before = tree(tmp_path)
    result = invoke("process", *[a.format(inp=inp) for a in args])
    assert result.exit_code == 2
    last = result.stderr.splitlines()[-1]
    assert message.fullmatch(last) if isinstance(message, re.Pattern) else last == message
    assert tree(tmp_path) == before


# -- security ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% include '/etc/passwd' %}", "template error: no loader for this environment specified"),
        (
            "{% extends '/etc/hostname' %}",
            "template error: no loader for this environment specified",
        ),
        (
            "{% import 'os' as os %}{{ os.system('id') }}",
            "template error: no loader for this environment specified",
        ),
        (
            "{% from 'subprocess' import call %}{{ call('id') }}",
            "template error: no loader for this environment specified",
        ),
        (
            "{{ cycler.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}",
            "template blocked by the sandbox: access to attribute '__init__' of 'type' object is unsafe.",
        ),
        (
            "{{ lipsum.__globals__['os'].popen('id').read() }}",
            "template blocked by the sandbox: access to attribute '__globals__' of 'function' object is unsafe.",
        ),
        (
            "{{ self.__dict__ }}",
            "template blocked by the sandbox: access to attribute '__dict__' of 'TemplateReference' object is unsafe.",
        ),
    ],
    ids=[
        "include-file",
        "extends-file",
        "import-os",
        "from-import",
        "builtins-open",
        "globals-os",
        "self-dict",
    ],
)
def test_template_cannot_read_files_or_import(tmp_path, no_model, template, message):
    inp = write_jsonl(tmp_path / "rows.jsonl", [{"text": "x"}])
    assert_rejected(tmp_path, inp, expected_stderr(inp, [(1, message)]), "--template", template)


def test_row_values_are_data_not_template_code():
    from mlxbatch.pipeline.render import render_text

    evil = "{{ cycler.__init__.__globals__.os.popen('id').read() }}{% include '/etc/passwd' %}"
    assert render_text("Review: {{ text }}", {"text": evil}) == f"Review: {evil}"


@pytest.mark.parametrize("flag, expected", [((), False), (("--trust-remote-code",), True)])
def test_trust_remote_code_is_off_unless_flagged(tmp_path, tiny_model, monkeypatch, flag, expected):
    import mlx_lm.utils

    calls: dict[str, list] = {"load_model": [], "load_tokenizer": []}

    def spy(name):
        real = getattr(mlx_lm.utils, name)

        def call(*args, **kwargs):
            calls[name].append((args, kwargs))
            return real(*args, **kwargs)

        return call

    for name in calls:
        monkeypatch.setattr(mlx_lm.utils, name, spy(name))
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    result = invoke("process", str(inp), "-m", tiny_model, "--max-tokens", "2", "-q", *flag)
    assert result.exit_code == 0, result.output
    [(_, model_kwargs)] = calls["load_model"]
    [((_, tokenizer_config), _)] = calls["load_tokenizer"]
    assert model_kwargs["trust_remote_code"] is expected
    assert tokenizer_config["trust_remote_code"] is expected


def test_row_values_are_never_used_as_paths(tmp_path, tiny_model):
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    tag = uuid.uuid4().hex
    targets = [
        tmp_path / f"escape-{tag}",  # ../../escape-<tag> from work/
        Path("/tmp") / f"mlxbatch-{tag}",
    ]
    rows = [
        {"id": f"../../escape-{tag}", "prompt": "a"},
        {"id": f"/tmp/mlxbatch-{tag}", "prompt": "b"},
        {"custom_id": f"../../escape-{tag}.jsonl", "prompt": "c"},
        {"id": "out", "prompt": "d", "output": f"/tmp/mlxbatch-{tag}"},
        {
            "id": "meta",
            "prompt": "e",
            "metadata": {"path": f"../../escape-{tag}", "store": f"/tmp/mlxbatch-{tag}"},
        },
        {"id": "stop", "prompt": "f", "stop": [f"/tmp/mlxbatch-{tag}"]},
    ]
    inp = write_jsonl(work / "in.jsonl", rows)
    before_tmp = set(os.listdir("/tmp"))
    result = invoke(
        "process",
        str(inp),
        "-o",
        str(work / "out.jsonl"),
        "-m",
        tiny_model,
        "--max-tokens",
        "2",
        "-q",
        "--max-errors",
        "1",
    )
    assert result.exit_code == 0, result.output
    for target in targets:
        for suffix in ("", ".jsonl", ".mlxbatch.sqlite", ".lock"):
            assert not Path(f"{target}{suffix}").exists()
    assert {n for n in set(os.listdir("/tmp")) - before_tmp if tag in n} == set()
    assert sorted(os.listdir(tmp_path)) == ["deep"]
    assert sorted(os.listdir(work)) == [
        "in.jsonl",
        "out.jsonl",
        "out.jsonl.errors.jsonl",
        "out.jsonl.manifest.json",
        "out.jsonl.mlxbatch.sqlite",
        "out.jsonl.mlxbatch.sqlite.lock",
    ]
    out = read_jsonl(work / "out.jsonl")
    assert [r["id"] for r in out] == [r.get("id", r.get("custom_id")) for r in rows]
    assert out[3]["error"] == {
        "code": "unsupported_parameter",
        "message": "unsupported parameter(s): output",
    }
