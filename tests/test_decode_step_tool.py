"""benchmarks.decode_step runs on the tiny model and reports both variants per round."""

from __future__ import annotations

import re

from benchmarks import decode_step


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
