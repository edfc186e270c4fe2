"""Constrained decoding on the tiny random model: a random model is the perfect adversary."""

from __future__ import annotations

import json

import jsonschema
import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.pipeline import constrain
from tests.conftest import read_jsonl, write_jsonl

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "mood", "tags", "home"],
    "additionalProperties": False,
}


def process(*args: str):
    return CliRunner().invoke(cli, ["process", *args], catch_exceptions=False)


def rows(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"Person number {i}:"} for i in range(n)]


def test_json_schema_outputs_always_validate(tmp_path, tiny_model):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    f = write_jsonl(tmp_path / "p.jsonl", rows(6))
    out = tmp_path / "o.jsonl"
    result = process(
        str(f),
        "-m",
        tiny_model,
        "--json-schema",
        str(schema),
        "-n",
        "3",
        "--temperature",
        "0.9",
        "--max-tokens",
        "120",
        "-o",
        str(out),
        "--max-errors",
        "100",
    )
    assert result.exit_code == 0, result.output
    records = read_jsonl(out)
    assert len(records) == 18
    parsed = [r for r in records if r["error"] is None]
    assert len(parsed) >= 9  # most rows finish within 120 tokens
    for r in records:
        if r["error"] is None:
            jsonschema.validate(r["parsed"], PERSON)
            assert json.loads(r["output"]) == r["parsed"]
            assert r["finish_reason"] == "stop"
        else:
            assert (r["finish_reason"], r["error"]["code"]) == ("length", "incomplete_json")
            assert "parsed" not in r
    # Samples of one row differ: sampling is seeded per sample, not per row.
    assert len({r["output"] for r in records if r["id"] == "p0"}) == 3


def test_constrained_sampling_does_not_depend_on_batch_size(tmp_path, tiny_model):
    f = write_jsonl(
        tmp_path / "p.jsonl", [{**r, "response_format": {"type": "json_object"}} for r in rows(5)]
    )
    outs = []
    for size in ("1", "8"):
        o = tmp_path / f"o{size}.jsonl"
        assert (
            process(
                str(f),
                "-m",
                tiny_model,
                "--temperature",
                "0.8",
                "--max-tokens",
                "24",
                "--batch-size",
                size,
                "-o",
                str(o),
                "--max-errors",
                "100",
            ).exit_code
            == 0
        )
        outs.append(o.read_bytes())
    assert outs[0] == outs[1]


def test_per_row_regex_and_truncation_is_an_error_record(tmp_path, tiny_model):
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "date", "prompt": "Date:", "regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"},
            {
                "id": "cut",
                "prompt": "JSON:",
                "response_format": {"type": "json_object"},
                "max_tokens": 2,
            },
        ],
    )
    out = tmp_path / "o.jsonl"
    result = process(str(f), "-m", tiny_model, "--max-tokens", "20", "-o", str(out))
    assert result.exit_code == 1
    date, cut = read_jsonl(out)
    assert len(date["output"]) == 10 and date["output"][:2] == "20" and date["error"] is None
    assert (cut["finish_reason"], cut["error"]["code"]) == ("length", "incomplete_json")
    assert [r["id"] for r in read_jsonl(tmp_path / "o.jsonl.errors.jsonl")] == ["cut"]


def test_choices_give_a_label_and_normalised_probabilities(tmp_path, tiny_model):
    reviews = [
        {"text": t}
        for t in ["great phone", "awful battery", "it is a phone", "love it", "broke in a day"]
    ]
    f = write_jsonl(tmp_path / "r.jsonl", reviews)
    out = tmp_path / "labels.jsonl"
    args = [
        str(f),
        "-m",
        tiny_model,
        "--template",
        "Review: {{ text }}",
        "--system",
        "Label the sentiment.",
        "--choices",
        "positive,negative,neutral",
        "-o",
        str(out),
    ]
    assert process(*args).exit_code == 0
    records = read_jsonl(out)
    for r in records:
        probs = r["choice_probs"]
        assert list(probs) == ["positive", "negative", "neutral"]
        assert abs(sum(probs.values()) - 1) < 1e-9
        assert r["output"] == r["parsed"] == max(probs, key=probs.get)
    # Without the shared-prefix cache the scores are the same.
    plain = tmp_path / "plain.jsonl"
    assert process(*args[:-1], str(plain), "--no-prefix-cache").exit_code == 0
    for a, b in zip(records, read_jsonl(plain), strict=True):
        assert a["output"] == b["output"]
        assert all(
            abs(a["choice_probs"][k] - b["choice_probs"][k]) < 1e-4 for k in a["choice_probs"]
        )


def test_choice_sampling_is_seeded(tmp_path, tiny_model):
    f = write_jsonl(
        tmp_path / "r.jsonl",
        [{"prompt": f"item {i}", "choices": ["x", "y", "z"], "n": 4} for i in range(3)],
    )
    outs = []
    for _ in range(2):
        o = tmp_path / f"o{len(outs)}.jsonl"
        assert (
            process(
                str(f), "-m", tiny_model, "--temperature", "2.0", "-o", str(o), "--fresh"
            ).exit_code
            == 0
        )
        outs.append([r["output"] for r in read_jsonl(o)])
    assert outs[0] == outs[1]
    assert len(set(outs[0])) > 1


def test_uncompilable_schema_is_an_input_problem(tmp_path, tiny_model):
    schema = tmp_path / "bad.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}})
    )
    f = write_jsonl(tmp_path / "p.jsonl", rows(1))
    result = process(str(f), "-m", tiny_model, "--json-schema", str(schema))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{schema}: cannot compile the constraint: regex parse error:")
    assert not (tmp_path / "p.out.jsonl").exists()


def test_choice_distribution_and_pick():
    probs = constrain.choice_distribution(["a", "b"], [-1.0, -2.0])
    assert probs["a"] == pytest.approx(1 / (1 + 2.718281828459045**-1))
    assert constrain.pick_choice(probs, 0.0, "s") == "a"
    draws = {constrain.pick_choice(probs, 1.0, f"s{i}") for i in range(50)}
    assert draws == {"a", "b"}
    assert constrain.pick_choice(probs, 1.0, "same") == constrain.pick_choice(probs, 1.0, "same")


def test_sampling_parameters_and_logprobs(tmp_path, tiny_model):
    rows = [
        {"id": "greedy", "prompt": "hello there", "top_logprobs": 3},
        {"id": "top1", "prompt": "hello there", "temperature": 1.5, "top_k": 1},
        {"id": "bias", "prompt": "hello there", "logit_bias": {"65": 100}},
        {"id": "minp", "prompt": "hello there", "temperature": 1.5, "min_p": 1.0},
        {"id": "norep", "prompt": "hello there", "logprobs": True, "max_tokens": 16},
        {
            "id": "rep",
            "prompt": "hello there",
            "repetition_penalty": 50.0,
            "logprobs": True,
            "max_tokens": 16,
        },
    ]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "o.jsonl"
    assert process(str(f), "-m", tiny_model, "--max-tokens", "5", "-o", str(out)).exit_code == 0
    greedy, top1, bias, minp, norep, rep = read_jsonl(out)
    # top_k=1 and min_p=1 keep only the most likely token: sampling becomes greedy.
    assert top1["output"] == greedy["output"] == minp["output"]
    content = greedy["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == greedy["output"]
    for c in content:
        assert len(c["top_logprobs"]) == 3
        assert c["top_logprobs"][0]["logprob"] == c["logprob"] <= 0
        assert [t["logprob"] for t in c["top_logprobs"]] == sorted(
            (t["logprob"] for t in c["top_logprobs"]), reverse=True
        )
    assert bias["output"] == "_____"  # token 65 is "_" in the tiny tokenizer

    # A huge repetition penalty cuts the repeats greedy decoding of a random model makes.
    def repeats(record):
        tokens = [c["token"] for c in record["logprobs"]["content"]]
        return len(tokens) - len(set(tokens))

    assert repeats(norep) > 0
    assert repeats(rep) < repeats(norep)
