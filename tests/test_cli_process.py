"""`mlxbatch process` end to end on the tiny model: outputs, resume, errors as records."""

from __future__ import annotations

import json
import re
import sqlite3

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.schemas import load_schema
from tests.conftest import WORDS, read_jsonl, write_jsonl


def prompts(n: int, start: int = 0) -> list[dict]:
    return [
        {"id": f"r{i}", "prompt": f"{i}: " + " ".join(WORDS[: 2 + (i * 5) % 13])}
        for i in range(start, start + n)
    ]


def process(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["process", *args], catch_exceptions=False, env=env)


def generated_count(summary: str) -> tuple[int, int]:
    m = re.search(r"(\d+) ok \((\d+) cached\)", summary)
    assert m, summary
    return int(m.group(1)), int(m.group(2))


def test_outputs_in_input_order_and_valid(tmp_path, tiny_model):
    f = write_jsonl(
        tmp_path / "p.jsonl",
        prompts(12) + [{"id": "chat", "messages": [{"role": "user", "content": "hi"}]}],
    )
    result = process(str(f), "-m", tiny_model, "--max-tokens", "6")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r"mlxbatch: done: 13 ok \(0 cached\), 0 failed of 13 rows; \d+ prompt \+ 78 generated tokens; "
        r"[\d.]+ tok/s; [\d.]+ s; peak memory \d+ MiB -> "
        + re.escape(str(tmp_path / "p.out.jsonl"))
        + "\n",
        result.stderr,
    )
    out = read_jsonl(tmp_path / "p.out.jsonl")
    assert [r["id"] for r in out] == [f"r{i}" for i in range(12)] + ["chat"]
    validator = jsonschema.Draft202012Validator(load_schema("output"))
    for record in out:
        validator.validate(record)
        assert record["finish_reason"] == "length" and record["usage"]["completion_tokens"] == 6
    assert not (tmp_path / "p.out.jsonl.errors.jsonl").exists()


def test_rerun_generates_nothing_and_grown_input_only_new_rows(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(8))
    out = tmp_path / "out.jsonl"
    assert process(str(f), "-m", tiny_model, "--max-tokens", "4", "-o", str(out)).exit_code == 0
    first = out.read_bytes()
    again = process(str(f), "-m", tiny_model, "--max-tokens", "4", "-o", str(out))
    assert generated_count(again.stderr) == (8, 8)
    assert out.read_bytes() == first
    write_jsonl(f, prompts(8) + prompts(3, start=8))
    grown = process(str(f), "-m", tiny_model, "--max-tokens", "4", "-o", str(out))
    assert generated_count(grown.stderr) == (11, 8)
    assert out.read_bytes().startswith(first)
    fresh = process(str(f), "-m", tiny_model, "--max-tokens", "4", "-o", str(out), "--fresh")
    assert generated_count(fresh.stderr) == (11, 0)


def test_changed_params_regenerate(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(4))
    assert process(str(f), "-m", tiny_model, "--max-tokens", "4").exit_code == 0
    changed = process(str(f), "-m", tiny_model, "--max-tokens", "5")
    assert generated_count(changed.stderr) == (4, 0)


def test_batch_size_does_not_change_greedy_output(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(10))
    outs = []
    for size in ("1", "4", "16"):
        o = tmp_path / f"o{size}.jsonl"
        assert (
            process(
                str(f), "-m", tiny_model, "--max-tokens", "8", "--batch-size", size, "-o", str(o)
            ).exit_code
            == 0
        )
        outs.append([r["output"] for r in read_jsonl(o)])
    assert outs[0] == outs[1] == outs[2]
    assert len(set(outs[0])) > 1


def test_seeded_sampling_is_batch_invariant_and_n_samples(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(5))
    sampled = [str(f), "-m", tiny_model, "--max-tokens", "8", "--temperature", "1.0", "-n", "3"]
    outs = []
    for size in ("1", "8"):
        o = tmp_path / f"s{size}.jsonl"
        assert process(*sampled, "--batch-size", size, "-o", str(o)).exit_code == 0
        outs.append(read_jsonl(o))
    assert outs[0] == outs[1]
    assert [(r["id"], r["sample_index"]) for r in outs[0]][:4] == [
        ("r0", 0),
        ("r0", 1),
        ("r0", 2),
        ("r1", 0),
    ]
    assert len({r["output"] for r in outs[0][:3]}) == 3
    other_seed = tmp_path / "seed1.jsonl"
    assert process(*sampled, "--seed", "1", "-o", str(other_seed)).exit_code == 0
    assert [r["output"] for r in read_jsonl(other_seed)] != [r["output"] for r in outs[0]]


def test_stop_strings_end_rows(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(6))
    base = tmp_path / "base.jsonl"
    assert process(str(f), "-m", tiny_model, "--max-tokens", "12", "-o", str(base)).exit_code == 0
    texts = [r["output"] for r in read_jsonl(base)]
    stop = next(t[len(t) // 2] for t in texts if t.strip())
    stopped = tmp_path / "stopped.jsonl"
    assert (
        process(
            str(f), "-m", tiny_model, "--max-tokens", "12", "--stop", stop, "-o", str(stopped)
        ).exit_code
        == 0
    )
    for full, record in zip(texts, read_jsonl(stopped), strict=False):
        if stop in full:
            assert record["output"] == full[: full.index(stop)]
            assert record["finish_reason"] == "stop"
        else:
            assert record["output"] == full


def test_runtime_row_errors_are_records(tmp_path, short_context_model):
    rows = [
        {"id": "ok", "prompt": "hello"},
        {"id": "long", "prompt": " ".join(WORDS * 10)},
        {"id": "huge-max", "prompt": "hi", "max_tokens": 1000},
        {"id": "typo", "prompt": "hi", "temprature": 0.3},
        {"id": "empty", "prompt": ""},
    ]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    result = process(str(f), "-m", short_context_model, "--max-tokens", "4")
    assert result.exit_code == 1
    assert "4 failed of 5 rows" in result.stderr
    out = read_jsonl(tmp_path / "p.out.jsonl")
    assert [(r["id"], r["error"]["code"] if r["error"] else None) for r in out] == [
        ("ok", None),
        ("long", "context_length_exceeded"),
        ("huge-max", "max_tokens_too_large"),
        ("typo", "unsupported_parameter"),
        ("empty", "empty_prompt"),
    ]
    assert out[3]["error"]["message"] == "unsupported parameter(s): temprature"
    errors = read_jsonl(tmp_path / "p.out.jsonl.errors.jsonl")
    assert [r["id"] for r in errors] == ["long", "huge-max", "typo", "empty"]
    tolerated = process(str(f), "-m", short_context_model, "--max-tokens", "4", "--max-errors", "4")
    assert tolerated.exit_code == 0


def test_template_rows_from_parquet_to_parquet(tmp_path, tiny_model):
    table = pa.table(
        {
            "review_id": [10, 11, 12],
            "text": ["great phone", "bad battery", "fine"],
            "stars": [5, 1, 3],
        }
    )
    src = tmp_path / "reviews.parquet"
    pq.write_table(table, src)
    out = tmp_path / "labels.parquet"
    result = process(
        str(src),
        "-m",
        tiny_model,
        "--template",
        "Review: {{ text }} ({{ stars }} stars)",
        "--system",
        "Label the sentiment.",
        "--id-field",
        "review_id",
        "--max-tokens",
        "3",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    got = pq.read_table(out).to_pylist()
    assert [(r["review_id"], r["text"], r["stars"], r["id"]) for r in got] == [
        (10, "great phone", 5, 10),
        (11, "bad battery", 1, 11),
        (12, "fine", 3, 12),
    ]
    assert all(
        r["finish_reason"] == "length" and r["completion_tokens"] == 3 and r["error_code"] is None
        for r in got
    )


def test_parquet_missing_template_column(tmp_path, tiny_model):
    src = tmp_path / "r.parquet"
    pq.write_table(pa.table({"body": ["x"]}), src)
    result = process(str(src), "-m", tiny_model, "--template", "{{ text }}")
    assert result.exit_code == 1
    assert (
        result.stderr.splitlines()[0] == f"{src}: column(s) 'text' used by the template are missing"
    )
    assert not (tmp_path / "r.out.jsonl").exists()


def test_openai_batch_in_openai_batch_out(tmp_path, tiny_model):
    def line(cid, **body):
        return {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "local",
                "messages": [{"role": "user", "content": f"say {cid}"}],
                **body,
            },
        }

    rows = [
        line("a", max_tokens=3),
        line("b", max_completion_tokens=2, n=2, temperature=0.7),
        line("c", tools=[]),
        {
            "custom_id": "d",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "once upon", "max_tokens": 2},
        },
    ]
    f = write_jsonl(tmp_path / "batch.jsonl", rows)
    # body.model "local" names no loaded model: run it anyway (tests/test_openai_parity.py).
    result = process(str(f), "-m", tiny_model, "--max-errors", "1", "--ignore-model")
    assert result.exit_code == 0, result.output
    out = read_jsonl(tmp_path / "batch.out.jsonl")
    validator = jsonschema.Draft202012Validator(load_schema("openai_output"))
    for record in out:
        validator.validate(record)
    assert [r["custom_id"] for r in out] == ["a", "b", "c", "d"]
    a, b, c, d = out
    assert a["response"]["body"]["object"] == "chat.completion"
    assert a["response"]["body"]["usage"]["completion_tokens"] == 3
    assert [ch["index"] for ch in b["response"]["body"]["choices"]] == [0, 1]
    assert c["response"] is None and c["error"] == {
        "code": "unsupported_parameter",
        "message": "unsupported parameter(s): tools",
    }
    assert (
        d["response"]["body"]["object"] == "text_completion"
        and "text" in d["response"]["body"]["choices"][0]
    )
    assert [r["custom_id"] for r in read_jsonl(tmp_path / "batch.out.jsonl.errors.jsonl")] == ["c"]


def test_empty_input_gives_empty_output(tmp_path, tiny_model):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    result = process(str(f), "-m", tiny_model)
    assert result.exit_code == 0
    assert (tmp_path / "empty.out.jsonl").read_text() == ""


def test_missing_output_directory_is_an_input_problem(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(1))
    result = process(str(f), "-m", tiny_model, "-o", str(tmp_path / "nope" / "o.jsonl"))
    assert result.exit_code == 1
    assert (
        result.stderr.splitlines()[0]
        == f"{tmp_path / 'nope' / 'o.jsonl'}: output directory {tmp_path / 'nope'} does not exist"
    )


def test_unknown_model_fails_cleanly(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(1))
    result = process(str(f), "-m", str(tmp_path / "no-model"))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: could not load model '{tmp_path / 'no-model'}'")


def test_damaged_store_is_reported_and_fresh_recovers(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(2))
    store = tmp_path / "p.out.jsonl.mlxbatch.sqlite"
    store.write_bytes(b"this is not a database" * 100)
    result = process(str(f), "-m", tiny_model, "--max-tokens", "2")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: {store}: the store is damaged (file is not a database); run again with --fresh"
    )
    assert process(str(f), "-m", tiny_model, "--max-tokens", "2", "--fresh").exit_code == 0
    assert len(list(tmp_path.glob("p.out.jsonl.mlxbatch.sqlite.corrupt-*"))) == 1
    assert sqlite3.connect(store).execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2


def test_injected_oom_splits_batches_then_fails_single_rows(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(8))
    base = tmp_path / "base.jsonl"
    assert (
        process(
            str(f), "-m", tiny_model, "--max-tokens", "5", "--batch-size", "8", "-o", str(base)
        ).exit_code
        == 0
    )
    split = tmp_path / "split.jsonl"
    result = process(
        str(f),
        "-m",
        tiny_model,
        "--max-tokens",
        "5",
        "--batch-size",
        "8",
        "-o",
        str(split),
        env={"MLXBATCH_INJECT_OOM_ROWS": "2"},
    )
    assert result.exit_code == 0, result.output
    assert split.read_bytes() == base.read_bytes()
    dead = tmp_path / "dead.jsonl"
    result = process(
        str(f),
        "-m",
        tiny_model,
        "--max-tokens",
        "5",
        "-o",
        str(dead),
        env={"MLXBATCH_INJECT_OOM_ROWS": "0"},
    )
    assert result.exit_code == 1
    assert {r["error"]["code"] for r in read_jsonl(dead)} == {"out_of_memory"}


def test_job_file_with_flag_override(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"text": "b"}])
    job = tmp_path / "job.yaml"
    job.write_text(
        f"input: {f}\nmodel: {tiny_model}\ntemplate: 'Say {{{{ text }}}}'\nmax_tokens: 2\n"
    )
    result = CliRunner().invoke(
        cli, ["process", "--job", str(job), "--max-tokens", "3"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert [r["usage"]["completion_tokens"] for r in read_jsonl(tmp_path / "rows.out.jsonl")] == [
        3,
        3,
    ]


def test_status_and_export(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    out = tmp_path / "p.out.jsonl"
    assert process(str(f), "-m", tiny_model, "--max-tokens", "2").exit_code == 0
    result = CliRunner().invoke(cli, ["status", str(out)])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        f"store: {out}.mlxbatch.sqlite",
        "rows: 3 total, 3 done, 0 failed, 0 pending",
        f"tokens: {sum(len(p['prompt'].split()) for p in prompts(3)) and lines[2].split()[1]} prompt, 6 generated",
    ]
    assert re.fullmatch(r"last run: #1 completed, started [\d-]+ [\d:]+, pid \d+", lines[3])
    data = json.loads(CliRunner().invoke(cli, ["status", str(out), "--json"]).stdout)
    assert (data["rows"], data["done"], data["last_run"]["status"]) == (3, 3, "completed")
    copy = tmp_path / "copy.jsonl"
    result = CliRunner().invoke(cli, ["export", str(out), "--to", str(copy)])
    assert result.stdout == f"wrote 3 lines to {copy}\n"
    assert copy.read_bytes() == out.read_bytes()
    missing = CliRunner().invoke(cli, ["status", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 1
    assert missing.stderr == f"Error: {tmp_path / 'none.jsonl'}.mlxbatch.sqlite: no such store\n"


@pytest.mark.parametrize("fmt", ["jsonl.gz"])
def test_gzip_input(tmp_path, tiny_model, fmt):
    import gzip

    f = tmp_path / f"p.{fmt}"
    with gzip.open(f, "wt") as g:
        g.write("".join(json.dumps(r) + "\n" for r in prompts(2)))
    assert process(str(f), "-m", tiny_model, "--max-tokens", "2").exit_code == 0
    assert len(read_jsonl(tmp_path / "p.out.jsonl")) == 2


def test_prefix_cache_gives_identical_greedy_output(tmp_path, tiny_model):
    system = "You label reviews. " + " ".join(WORDS * 6)
    rows = [{"id": i, "text": " ".join(WORDS[: 3 + i % 11]) + f" #{i}"} for i in range(24)]
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    outs = {}
    for flag in ("--prefix-cache", "--no-prefix-cache"):
        o = tmp_path / f"{flag}.jsonl"
        args = [
            str(f),
            "-m",
            tiny_model,
            "--template",
            "Review: {{ text }}",
            "--system",
            system,
            "--max-tokens",
            "6",
            "-o",
            str(o),
            flag,
        ]
        assert process(*args).exit_code == 0
        outs[flag] = read_jsonl(o)
    assert outs["--prefix-cache"] == outs["--no-prefix-cache"]
    assert len({r["output"] for r in outs["--prefix-cache"]}) > 1


def test_mixed_greedy_and_sampled_rows_do_not_depend_on_batch(tmp_path, tiny_model):
    rows = [
        {**r, "temperature": [0.0, 0.9, 1.3][i % 3], "top_p": [1.0, 0.8][i % 2]}
        for i, r in enumerate(prompts(9))
    ]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    outs = []
    for size in ("1", "3", "16"):
        o = tmp_path / f"o{size}.jsonl"
        assert (
            process(
                str(f),
                "-m",
                tiny_model,
                "--max-tokens",
                "10",
                "-n",
                "2",
                "--batch-size",
                size,
                "-o",
                str(o),
            ).exit_code
            == 0
        )
        outs.append(o.read_bytes())
    assert outs[0] == outs[1] == outs[2]
