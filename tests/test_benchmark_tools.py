"""The benchmark tools that explain a run: decode_step on the tiny model, timeline's trace."""

from __future__ import annotations

import re

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
