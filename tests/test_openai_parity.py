"""OpenAI Batch API request lines: every shape the API accepts, its output and error shapes."""

from __future__ import annotations

import os

import jsonschema
import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.schemas import load_schema
from tests.conftest import read_jsonl, write_jsonl

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "say hi"}]


def line(cid: str, url: str = CHAT, **body) -> dict:
    if url == CHAT:
        body.setdefault("messages", HI)
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"max_tokens": 3, **body}}


def run(tmp_path, model: str, rows: list[dict], *args: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = write_jsonl(tmp_path / "batch.jsonl", rows)
    result = CliRunner().invoke(
        cli, ["process", str(f), "-m", model, "--max-errors", "100", *args], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    out = read_jsonl(tmp_path / "batch.out.jsonl")
    validator = jsonschema.Draft202012Validator(load_schema("openai_output"))
    for record in out:
        validator.validate(record)
    return {r["custom_id"]: r for r in out}


def test_accepted_body_shapes(tmp_path, tiny_model):
    name = os.path.basename(tiny_model)
    rows = [
        line("plain", model=name),
        line("nulls", model=name, seed=None, stop=None, temperature=None, response_format=None),
        line("mct", model=name, max_completion_tokens=2, max_tokens=None),
        line("n2", model=name, n=2, temperature=0.8, seed=7),
        line("stop", model=name, stop=["zzz", "qqq"]),
        line("text_format", model=name, response_format={"type": "text"}),
        line("lp", model=name, logprobs=True, top_logprobs=2),
        line(
            "neutral",
            model=name,
            stream=False,
            frequency_penalty=0,
            presence_penalty=0.0,
            user="u1",
            metadata={"team": "a"},
            store=False,
            service_tier="auto",
            parallel_tool_calls=True,
        ),  # fmt: skip
        line("no_model"),
        line("full_path", model=tiny_model),
        line("one_prompt", COMPLETIONS, model=name, prompt=["once upon"]),
        line("ids", COMPLETIONS, model=name, prompt=[10, 11, 12]),
        line(
            "one_ids",
            COMPLETIONS,
            model=name,
            prompt=[[10, 11, 12]],
            echo=False,
            best_of=1,
            suffix="",
        ),  # fmt: skip
        line("legacy_lp", COMPLETIONS, model=name, prompt="once upon", logprobs=2),
    ]
    out = run(tmp_path, tiny_model, rows)
    assert list(out) == [r["custom_id"] for r in rows]
    assert {cid for cid, r in out.items() if r["error"] is not None} == set()
    body = {cid: r["response"]["body"] for cid, r in out.items()}
    assert body["mct"]["usage"]["completion_tokens"] == 2
    assert [c["index"] for c in body["n2"]["choices"]] == [0, 1]
    lp = body["lp"]["choices"][0]["logprobs"]["content"]
    assert len(lp) == 3 and all(len(t["top_logprobs"]) == 2 for t in lp)
    # A prompt in a list of one is that prompt; token ids are the prompt's tokens exactly.
    assert body["one_prompt"]["usage"] == body_of(run(tmp_path / "s", tiny_model, [
        line("s", COMPLETIONS, model=name, prompt="once upon")]))["usage"]  # fmt: skip
    assert body["ids"]["usage"]["prompt_tokens"] == 3
    assert body["ids"]["choices"] == body["one_ids"]["choices"]
    assert body["ids"]["object"] == "text_completion"


def body_of(out: dict) -> dict:
    return next(iter(out.values()))["response"]["body"]


def test_completions_logprobs_integer_gives_the_legacy_shape(tmp_path, tiny_model):
    rows = [line("c", COMPLETIONS, prompt="once upon", logprobs=3, max_tokens=4)]
    choice = body_of(run(tmp_path, tiny_model, rows))["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert all(isinstance(alt, dict) and 1 <= len(alt) <= 3 for alt in lp["top_logprobs"])
    for token, logprob, alternatives in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert alternatives[token] == logprob <= 0  # greedy: the chosen token is the best
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets
    zero = run(tmp_path / "z", tiny_model, [line("z", COMPLETIONS, prompt="once upon", logprobs=0)])
    assert all(len(alt) == 1 for alt in body_of(zero)["choices"][0]["logprobs"]["top_logprobs"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": []}, "unsupported parameter(s): tools"),
        ({"stream": True}, "unsupported parameter(s): stream (only false is supported)"),
        (
            {"frequency_penalty": 0.5, "presence_penalty": 1},
            "unsupported parameter(s): frequency_penalty (only 0 is supported), "
            "presence_penalty (only 0 is supported)",
        ),
        (
            {"reasoning_effort": "low", "tool_choice": "auto"},
            "unsupported parameter(s): reasoning_effort, tool_choice",
        ),  # fmt: skip
    ],
)
def test_unsupported_fields_are_error_records_naming_them(tmp_path, tiny_model, body, message):
    out = run(tmp_path, tiny_model, [line("ok"), line("bad", **body)], "--ignore-model")
    assert out["ok"]["error"] is None
    assert out["bad"]["response"] is None
    assert out["bad"]["error"] == {"code": "unsupported_parameter", "message": message}
    errors = read_jsonl(tmp_path / "batch.out.jsonl.errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["bad"]


def test_completions_special_cases(tmp_path, tiny_model):
    rows = [
        line("many", COMPLETIONS, prompt=["a", "b"]),
        line("many_ids", COMPLETIONS, prompt=[[1, 2], [3]]),
        line("vocab", COMPLETIONS, prompt=[5, 100000]),
        line("best_of", COMPLETIONS, prompt="x", best_of=3),
        line("echo", COMPLETIONS, prompt="x", echo=True),
    ]
    out = run(tmp_path, tiny_model, rows, "--ignore-model")
    errors = {cid: r["error"] for cid, r in out.items()}
    assert errors["many"] == {
        "code": "unsupported_parameter",
        "message": "prompt is a list of 2 prompts; send one request line per prompt",
    }
    assert errors["many_ids"]["message"].startswith("prompt is a list of 2 prompts")
    assert errors["vocab"] == {
        "code": "invalid_prompt",
        "message": "token id 100000 is outside the vocabulary (0 to 511)",
    }
    assert (
        errors["best_of"]["message"]
        == "unsupported parameter(s): best_of (only equal to n is supported)"
    )
    assert errors["echo"]["message"] == "unsupported parameter(s): echo (only false is supported)"


def test_model_mismatch_is_an_error_record_unless_ignored(tmp_path, tiny_model):
    name = os.path.basename(tiny_model)
    rows = [line("same", model=name), line("other", model="gpt-4o-mini")]
    out = run(tmp_path, tiny_model, rows)
    assert out["same"]["error"] is None
    assert out["other"]["response"] is None
    assert out["other"]["error"] == {
        "code": "model_mismatch",
        "message": f"body.model 'gpt-4o-mini' is not the loaded model {tiny_model!r}; "
        "pass --ignore-model to run it with the loaded model anyway",
    }
    ignored = run(tmp_path / "i", tiny_model, rows, "--ignore-model")
    assert ignored["other"]["error"] is None
    assert ignored["other"]["response"]["body"]["model"] == tiny_model

    job = tmp_path / "job.yaml"
    batch = write_jsonl(tmp_path / "j.jsonl", rows)
    job.write_text(f"input: {batch}\nmodel: {tiny_model}\nignore_model: true\nmax_tokens: 2\n")
    result = CliRunner().invoke(cli, ["process", "--job", str(job)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert all(r["error"] is None for r in read_jsonl(tmp_path / "j.out.jsonl"))


def test_schema_rejects_wrong_logprobs_types_before_the_model_loads(tmp_path, tiny_model):
    rows = [
        line("chat_int", logprobs=2),
        line("too_many", COMPLETIONS, prompt="x", logprobs=21),
        line("empty_ids", COMPLETIONS, prompt=[]),
    ]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = CliRunner().invoke(cli, ["validate", str(f)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == f"{f}:1: 2 is not of type 'boolean' (at $.body.logprobs)"
    assert lines[1].startswith(f"{f}:2: ") and lines[1].endswith("(at $.body.logprobs)")
    assert lines[2].startswith(f"{f}:3: ") and lines[2].endswith("(at $.body.prompt)")


def test_empty_batch_file_gives_empty_output(tmp_path, tiny_model):
    f = tmp_path / "batch.jsonl"
    f.write_text("")
    result = CliRunner().invoke(
        cli, ["process", str(f), "-m", tiny_model, "--input-format", "openai"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "batch.out.jsonl").read_text() == ""
    assert not (tmp_path / "batch.out.jsonl.errors.jsonl").exists()
