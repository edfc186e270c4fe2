"""`mlxbatch validate` and the input checks `process` runs before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from tests.conftest import write_jsonl


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_valid_file_reports_rows(tmp_path):
    f = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}]
    )
    result = run("validate", str(f))
    assert result.exit_code == 0
    assert result.stdout == f"{f}: 2 rows OK (prompt rows, 2 tasks)\n"


def test_every_problem_is_reported_with_file_line_and_path(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(
        '{"prompt": "ok"}\n'
        "{not json\n"
        "[1, 2]\n"
        '{"text": "no prompt"}\n'
        '{"prompt": 5}\n'
        '{"messages": []}\n'
        '{"messages": [{"role": "robot", "content": "x"}]}\n'
        '{"messages": [{"role": "user", "content": 3}]}\n'
        '{"id": "x", "prompt": "a"}\n'
        '{"id": "x", "prompt": "b"}\n'
        '{"prompt": "a", "max_tokens": 0}\n'
    )
    result = run("validate", str(f))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{f}:2: malformed JSON: Expecting property name enclosed in double quotes at column 2",
        f"{f}:3: expected a JSON object, got array",
        f"{f}:4: row has neither 'prompt' nor 'messages' (pass --template to render other rows)",
        f"{f}:5: 5 is not of type 'string' (at $.prompt)",
        f"{f}:6: [] should be non-empty (at $.messages)",
        f"{f}:7: 'robot' is not one of ['system', 'developer', 'user', 'assistant', 'tool'] (at $.messages[0].role)",
        f"{f}:8: 3 is not of type 'string' (at $.messages[0].content)",
        f"{f}:10: duplicate id 'x' (first at line 9) (at $.id)",
        f"{f}:11: 0 is less than the minimum of 1 (at $.max_tokens)",
        "Error: 9 input problem(s); nothing was generated",
    ]


def test_problems_are_capped_with_a_count(tmp_path):
    f = tmp_path / "many.jsonl"
    f.write_text("nope\n" * 60)
    result = run("validate", str(f))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 52
    assert lines[-2] == "... and 10 more problem(s)"
    assert lines[-1] == "Error: 60 input problem(s); nothing was generated"


def test_empty_file_is_valid(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    result = run("validate", str(f))
    assert result.exit_code == 0
    assert result.stdout == f"{f}: 0 rows OK (prompt rows, 0 tasks)\n"


def test_missing_file_and_directory(tmp_path):
    result = run("validate", str(tmp_path / "nope.jsonl"))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"{tmp_path / 'nope.jsonl'}: no such file"
    result = run("validate", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"{tmp_path}: is a directory, not an input file"


def test_openai_envelope_problems(tmp_path):
    good = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    rows = [
        good,
        {**good, "custom_id": "r2", "url": "/v1/embeddings"},
        {**good, "custom_id": "r3", "method": "GET"},
        {**good, "custom_id": "r1"},
        {**good, "custom_id": "r4", "body": {"model": "m"}},
    ]
    f = write_jsonl(tmp_path / "batch.jsonl", rows)
    result = run("validate", str(f))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{f}:2: '/v1/embeddings' is not one of ['/v1/chat/completions', '/v1/completions'] (at $.url)",
        f"{f}:3: 'POST' was expected (at $.method)",
        f"{f}:4: duplicate id 'r1' (first at line 1) (at $.custom_id)",
        f"{f}:5: 'messages' is a required property (at $.body)",
        "Error: 4 input problem(s); nothing was generated",
    ]


def test_template_rows_need_their_fields(tmp_path):
    f = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"text": "good"}, {"title": "x"}, {"text": None}, {"text": {"a": 1}}],
    )
    result = run("validate", str(f), "--template", "Review: {{ text }}")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[:3] == [
        f"{f}:2: row has no field 'text' used by the template (at $.text)",
        f"{f}:3: field 'text' used by the template is null (at $.text)",
        f"{f}:4: field 'text' used by the template is a nested object; templates take strings and numbers (at $.text)",
    ]


def test_user_schema_applies_to_rows(tmp_path):
    schema = tmp_path / "rows.schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "required": ["text"],
                "properties": {"text": {"type": "string", "minLength": 1}},
            }
        )
    )
    f = write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, {"text": ""}])
    result = run("validate", str(f), "--template", "{{ text }}", "--input-schema", str(schema))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"{f}:2: '' should be non-empty (at $.text)"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ text.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ 'a' * 10**10 }}",
        "{{ 2 ** 100000000 }}",
    ],
)
def test_sandbox_blocks_template_escapes(tmp_path, template):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"text": "x"}])
    result = run("validate", str(f), "--template", template)
    assert result.exit_code == 1
    line = result.stderr.splitlines()[0]
    assert line.startswith(f"{f}:1: template ")
    assert "__" in line or "undefined" in line or "larger than" in line or "longer than" in line


def test_template_syntax_error_is_an_input_problem(tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"text": "x"}])
    result = run("validate", str(f), "--template", "{{ text ")
    assert result.exit_code == 1
    assert result.stderr.startswith("{{ text : template syntax error:")


def test_job_file_is_validated(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: x.jsonl\nmax_tokens: -1\ncolour: blue\n")
    result = run("validate", "--job", str(job))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{job}: Additional properties are not allowed ('colour' was unexpected)",
        f"{job}: -1 is less than the minimum of 1 (at $.max_tokens)",
        "Error: 2 input problem(s); nothing was generated",
    ]


def test_usage_errors_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["validate"])
    assert result.exit_code == 2
    assert "missing INPUT" in result.stderr
    result = CliRunner().invoke(cli, ["process", "x.jsonl", "--max-tokens", "0"])
    assert result.exit_code == 2


def test_help_and_validate_do_not_import_mlx(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    code = (
        f"import sys; from mlxbatch.cli import main; sys.argv=['mlxbatch','validate',{str(f)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'mlx' not in sys.modules and 'mlx_lm' not in sys.modules, 'mlx imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
