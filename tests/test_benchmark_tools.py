"""The benchmark tools that explain a run: decode_step, prefill_rows and reuse_ties on the tiny
model, timeline's trace, ab, scale, the benchmark tokenizer."""

from __future__ import annotations

import os
import re

import pytest

from benchmarks import decode_step, timeline


def test_decode_step_reports_each_variant(tiny_model, capsys):
    decode_step.main(
        ["--model", tiny_model, "--rows", "3", "--prefix", "24", "--steps", "3", "--repeat", "1",
         "--stub-attention"]
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "3 rows behind a 24-token prefix, 3 steps, ms per step"
    pattern = r"  (attention|stubbed attention) +build +[\d.]+  async_eval +[\d.]+  wait +[\d.]+  total +[\d.]+"
    assert [re.fullmatch(pattern, line).group(1) for line in lines[1:]] == [
        "attention",
        "stubbed attention",
    ]


def test_prefilled_batch_holds_the_prefix_once(tiny_model):
    from mlxbatch.pipeline.engine import Engine

    engine = Engine(tiny_model)
    cache, tokens = decode_step.prefilled_batch(engine, rows=4, prefix_tokens=30)
    assert tokens.shape == (4,)
    assert all(layer.prefix is not None and layer.prefix[0].shape[2] == 30 for layer in cache)


def test_trace_lists_stages_in_the_order_they_started(capsys):
    totals = {
        "load model": [1, 0.5, 10.25, 10.75],
        "  read weights (worker)": [1, 0.4, 10.5, 10.9],
        "check inputs": [1, 0.1, 10.0, 10.1],
        "export": [0, 0.0, 0.0, 0.0],  # never called: not listed
    }
    timeline.print_trace(totals, t0=10.0)
    assert capsys.readouterr().out.splitlines() == [
        "  check inputs             0.000 ->   0.100 s  (1 calls)",
        "  load model               0.250 ->   0.750 s  (1 calls)",
        "  read weights (worker)    0.500 ->   0.900 s  (1 calls)",
    ]


def test_ab_alternates_the_variants_and_puts_their_settings_back(tiny_model, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    from benchmarks import ab
    from mlxbatch.jobs import runner
    from mlxbatch.pipeline.engine import prefix

    monkeypatch.delenv("MLXBATCH_DECODE_ATTENTION", raising=False)
    before = prefix.MAX_PADDING
    seen = []  # what each run saw: (prefix reuse, MAX_PADDING, the variable)
    systems = set()
    real = runner.run_job

    def spied(spec):
        systems.add(spec.system)
        seen.append(
            (spec.prefix_cache, prefix.MAX_PADDING, os.environ.get("MLXBATCH_DECODE_ATTENTION"))
        )
        return real(spec)

    monkeypatch.setattr(runner, "run_job", spied)
    settings = "mlxbatch.pipeline.engine.prefix.MAX_PADDING=0.5,prefix_cache=False"
    ab.main(
        ["--model", tiny_model, "--rows", "4", "--max-tokens", "3", "--rounds", "2",
         "--system-tokens", "200", "--data-dir", str(tmp_path), "--variant", "plain", "--variant", f"other:{settings}",
         "--variant", "env:MLXBATCH_DECODE_ATTENTION=mlx"]
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"labelling: 4 prompts, 2 rounds, {tiny_model}"
    pattern = (
        r"(\w+) +median +[\d.]+ s +[\d.]+x  same output rows 4/4  peak ([\d,]+) MiB  "
        r"runs [\d.]+ [\d.]+"
    )
    matches = [re.fullmatch(pattern, line) for line in lines[1:]]
    assert [m.group(1) for m in matches] == ["plain", "other", "env"]
    assert all(int(m.group(2).replace(",", "")) > 0 for m in matches)  # the model's weights
    plain, other, env = (True, before, None), (False, 0.5, None), (True, before, "mlx")
    # Warm-ups, then round 1 in order and round 2 reversed.
    assert seen == [plain, other, env, plain, other, env, env, other, plain]
    assert before == prefix.MAX_PADDING
    assert "MLXBATCH_DECODE_ATTENTION" not in os.environ
    # One system prompt, grown to --system-tokens tokens of the model's tokenizer and no further
    # than one more few-shot example.
    [system] = systems
    from benchmarks.run import _token_counter

    assert 200 <= _token_counter(tiny_model)(system) < 400


def test_ab_runs_variants_in_alternating_order():
    from benchmarks.ab import Variant, alternating

    a, b = Variant.parse("a"), Variant.parse("b:x.Y=1,SOME_ENV=on,n=2")
    assert (b.constants, b.env, b.spec) == ({"x.Y": 1}, {"SOME_ENV": "on"}, {"n": 2})
    assert [v.name for v in alternating([a, b], 3)] == ["a", "b", "b", "a", "a", "b"]


def test_ab_ends_on_a_run_that_did_not_complete(tiny_model, tmp_path, monkeypatch):
    """A run stopped early (SIGTERM from `timeout`) leaves a partial output: not a result."""
    from benchmarks import ab
    from mlxbatch.jobs import runner

    real = runner.run_job

    def stopped(spec):
        summary = real(spec)
        if "warm" not in spec.output_path:
            summary.status = "interrupted"
        return summary

    monkeypatch.setattr(runner, "run_job", stopped)
    with pytest.raises(SystemExit, match="^plain: the run was interrupted$"):
        ab.main(
            ["--model", tiny_model, "--rows", "2", "--max-tokens", "2", "--rounds", "1",
             "--system-tokens", "200", "--data-dir", str(tmp_path), "--variant", "plain"]
        )  # fmt: skip


def test_prefill_rows_reports_each_pass_size_and_padding_limit(tiny_model, tmp_path, capsys):
    from benchmarks import prefill_rows

    prefill_rows.main(
        ["--model", tiny_model, "--rows", "6", "--system-tokens", "200", "--repeat", "1",
         "--data-dir", str(tmp_path), "--limits", "0.125,1e9", "--tokens-per-pass", "16,4096"]
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"6 rows after a \d+-token prefix, \d+ tokens to prefill", lines[0])
    pattern = (
        r" +(\d+) tokens a pass, max padding (\S+) +(\d+) batches +[\d.]+x tokens  median "
        r"[\d.]+ s  \(first [\d.]+ s\)  peak \+([\d,.]+) MiB"
    )
    settings = [re.fullmatch(pattern, line).groups() for line in lines[1:]]  # type: ignore[union-attr]
    assert [s[:2] for s in settings] == [
        ("16", "0.125"), ("16", "1e+09"), ("4096", "0.125"), ("4096", "1e+09")
    ]  # fmt: skip
    # 16 tokens a pass holds one row a batch; 4,096 without a padding limit takes all six.
    assert settings[0][2] == "6" and settings[3][2] == "1"
    assert all(float(s[3].replace(",", "")) > 0 for s in settings)


def test_scale_appends_a_percent_and_the_nightly_run_generates_only_those(tiny_model, tmp_path):
    import json

    from benchmarks import scale

    out = tmp_path / "scale.json"
    scale.main(["--rows", "400", "--model", tiny_model, "--json", str(out)])
    [result] = json.loads(out.read_text())
    assert result["rows"] == 400 and result["resume"]["results"] == 400
    nightly = result["nightly_stats"]
    assert (nightly["ok"], nightly["cached"], nightly["rows"]) == (4, 400, 404)
    assert nightly["first_generation_after"] > 0


def test_scale_run_ending_as_its_kill_point_is_reached_is_not_counted_killed(
    tiny_model, tmp_path, monkeypatch
):
    """The run ends on its own between the harness's last look and its SIGKILL."""
    import time

    from benchmarks import scale

    def ended_unreaped(store):
        # Wait until the child has exited, leaving it for run_cli to reap; then report "done".
        try:
            while os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                time.sleep(0.05)
        except ChildProcessError:  # reaped already: run_cli's last count
            pass
        return 10**9

    inp = tmp_path / "rows.jsonl"
    scale.write_rows(inp, 20)
    monkeypatch.setattr(scale, "stored_results", ended_unreaped)
    monkeypatch.setattr(os, "wait4", _first_look_not_ended(os.wait4))
    run = scale.run_cli(inp, tiny_model, 10_000, kill_at=18)
    assert run["killed"] is False


def _first_look_not_ended(wait4):
    """os.wait4 whose first WNOHANG look says the child is still running."""
    looks = []

    def waiting(pid, options):
        if options & os.WNOHANG and not looks:
            looks.append(pid)
            return 0, 0, None
        return wait4(pid, options)

    return waiting


def test_benchmark_tokenizer_makes_a_workload_word_about_one_token():
    # The workloads count words ("rows of 20-60 words"); a real tokenizer encodes these
    # words as ~1.1 tokens each (GPT-2's BPE: 1.10), one that never saw them as ~3.4.
    import random

    from benchmarks.workloads import _words, tokenizer_corpus
    from mlxbatch.testing.tiny_model import _build_tokenizer

    rng = random.Random("labelling:0")
    rows = [_words(rng, 20, 60) for _ in range(64)]
    words = sum(len(r.split()) for r in rows)

    def per_word(corpus):
        tokenizer = _build_tokenizer(4096, corpus)
        return sum(len(tokenizer.encode(r).ids) for r in rows) / words

    assert per_word(tokenizer_corpus()) < 1.2
    assert per_word(()) > 3  # the tests' own tokenizer, which does not learn them


def test_reuse_ties_finds_float32_rows_identical_with_and_without_reuse(
    tiny_model, tmp_path, capsys
):
    from benchmarks import reuse_ties

    reuse_ties.main(["--model", tiny_model, "--rows", "6", "--system-tokens", "200",
                     "--data-dir", str(tmp_path)])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "auto: 6/6 rows the same with and without reuse"
    assert re.fullmatch(
        r"top-2 logprob margin over all 48 tokens with reuse: median [\d.]+, 1st percentile [\d.]+",
        lines[1],
    )
    assert len(lines) == 2


def test_reuse_ties_lists_where_each_differing_row_parts(monkeypatch, capsys):
    from benchmarks import reuse_ties

    def entry(token: str, top: float, second: float) -> dict:
        return {"token": token, "top_logprobs": [{"logprob": top}, {"logprob": second}]}

    def row(text: str, tokens: list[dict]) -> dict:
        return {"output": text, "logprobs": {"content": tokens}}

    runs = {
        True: {"a": row("xy", [entry("x", -1, -2), entry("y", -1, -1.25)]),
               "b": row("x", [entry("x", -1, -3)]),
               "c": row("x", [entry("x", -1, -3)]),
               "d": {"output": "", "error": {"code": "out_of_memory", "message": "m"}}},
        False: {"a": row("xz", [entry("x", -1, -2), entry("z", -1, -1.0)]),
                "b": row("x", [entry("x", -1, -3)]),
                "c": row("xw", [entry("x", -1, -3), entry("w", -1, -2)]),
                "d": row("x", [entry("x", -1, -3)])},
    }  # fmt: skip
    monkeypatch.setattr(reuse_ties, "workload_for", lambda args: ("model", None))
    monkeypatch.setattr(reuse_ties, "_run", lambda wl, model, out, *, dtype, reuse: runs[reuse])
    reuse_ties.main(["--dtype", "bfloat16"])
    assert capsys.readouterr().out.splitlines() == [
        "bfloat16: 1/3 rows the same with and without reuse",
        "rows that are error records in one run or both (not compared): 1",
        "top-2 logprob margin over all 4 tokens with reuse: median 1.5000, 1st percentile 0.25000",
        "  a: first different token 1, top-2 margin with reuse 0.25000, without 0.00000",
        "  c: one text ends where the other goes on (token 1)",
    ]
