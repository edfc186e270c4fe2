"""A failing generation step: the batch halves, a row failing alone is an error record (the
right one) and the batch goes back to full size; rows failing alike stop the run, clearly."""

from __future__ import annotations

import sqlite3

import pytest

from mlxbatch.pipeline.engine.batch import BatchRun
from mlxbatch.pipeline.engine.errors import EngineBroken, StepFailures
from tests.conftest import read_jsonl, write_jsonl
from tests.test_cli_process import process, prompts

KERNEL_ERROR = 'Failed to compile kernel: cannot open source file "crt/mma.h"\n  #include'


def test_halves_the_batch_then_fails_the_row_and_goes_back_to_full_size():
    failures = StepFailures(8)
    e = RuntimeError("boom")
    assert [failures.failed(e) for _ in range(3)] == [False, False, False]
    assert failures.size == 1
    assert failures.failed(e) is True
    assert failures.size == 8


def test_a_row_out_of_memory_alone_leaves_the_longer_rows_after_it_one_at_a_time():
    failures = StepFailures(4)
    oom = RuntimeError("[malloc] out of memory")
    assert [failures.failed(oom) for _ in range(3)] == [False, False, True]
    assert failures.size == 1


def test_rows_failing_alone_with_one_error_mean_a_broken_engine():
    failures = StepFailures(1)
    e = RuntimeError(KERNEL_ERROR)
    assert failures.failed(e) and failures.failed(e)
    with pytest.raises(EngineBroken) as raised:
        failures.failed(e)
    assert str(raised.value) == (
        "generation failed for 3 rows in a row, each run alone, with the same error: "
        'Failed to compile kernel: cannot open source file "crt/mma.h". Finished rows are '
        "kept; run again to retry the rest"
    )


def test_a_finished_row_another_error_or_running_out_of_memory_starts_the_count_again():
    failures = StepFailures(1)
    a, b = RuntimeError("a"), RuntimeError("b")
    for e in (a, a):
        failures.failed(e)
    failures.finished()
    for e in (a, b, b):
        failures.failed(e)
    oom = RuntimeError("[malloc] out of memory")
    for _ in range(5):  # depends on the row: never a broken engine
        failures.failed(oom)
    with pytest.raises(EngineBroken):
        for _ in range(3):
            failures.failed(a)


def test_one_bad_row_is_an_error_record_and_batches_go_back_to_full_size(
    tmp_path, tiny_model, monkeypatch
):
    rows = prompts(8)
    bad = rows[3]["id"]  # in the first batch of four, decoded second (by length)
    sizes = []
    real_init, real_take = BatchRun.__init__, BatchRun._take

    def init(self, engine, groups, completion, *args, **kwargs):
        sizes.append(completion)
        real_init(self, engine, groups, completion, *args, **kwargs)

    def take(self, step):
        # Fails whenever the bad row is being decoded, as a row-specific error would.
        if any(self.tasks[uid].id == bad for uid in step.uids if uid in self.tasks):
            raise RuntimeError("bad row")
        real_take(self, step)

    monkeypatch.setattr(BatchRun, "__init__", init)
    monkeypatch.setattr(BatchRun, "_take", take)
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out.jsonl"
    result = process(str(f), "-m", tiny_model, "--max-tokens", "3", "--batch-size", "4",
                     "-o", str(out), "--max-errors", "1")  # fmt: skip
    assert result.exit_code == 0, result.output
    written = read_jsonl(out)
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    assert [r["id"] for r in written if r["finish_reason"] == "error"] == [bad]
    [error] = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert (error["id"], error["error"]) == (
        bad,
        {"code": "generation_error", "message": "bad row"},
    )
    # Halved down to the bad row alone, then full batches again for the rows after it.
    assert sizes[:3] == [4, 2, 1]
    assert sizes[3] == 4


def test_every_row_failing_alike_stops_the_run_and_keeps_finished_rows(
    tmp_path, tiny_model, monkeypatch
):
    rows = prompts(8)
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out.jsonl"
    real_take = BatchRun._take
    healthy = {rows[0]["id"], rows[3]["id"]}  # decoded first (by length)

    def take(self, step):
        # Every step with another row fails alike, as when a kernel does not build.
        if any(self.tasks[uid].id not in healthy for uid in step.uids if uid in self.tasks):
            raise RuntimeError(KERNEL_ERROR)
        real_take(self, step)

    monkeypatch.setattr(BatchRun, "_take", take)
    # Batches of 8: the two rows that finish (in a batch of two) are still in the buffer of
    # results the run commits a batch at a time.
    result = process(str(f), "-m", tiny_model, "--max-tokens", "3", "--batch-size", "8",
                     "-o", str(out))  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: generation failed for 3 rows in a row, each run alone, with the same error: "
        'Failed to compile kernel: cannot open source file "crt/mma.h". Finished rows are '
        "kept; run again to retry the rest\n"
    )
    store = sqlite3.connect(f"{out}.mlxbatch.sqlite")
    ok = store.execute("SELECT COUNT(*) FROM results WHERE error_code IS NULL").fetchone()[0]
    assert ok == 2
    # Run again with the engine mended: the finished rows are not generated again.
    monkeypatch.setattr(BatchRun, "_take", real_take)
    again = process(str(f), "-m", tiny_model, "--max-tokens", "3", "-o", str(out))
    assert again.exit_code == 0, again.output
    assert "(2 cached)" in again.stderr
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in rows]


def test_scoring_choices_stops_too_when_every_row_fails_alike(tmp_path, tiny_model, monkeypatch):
    from mlxbatch.pipeline.engine import score

    calls = []

    def broken(*args):
        calls.append(args)
        if len(calls) > 1:  # the first row is scored, then every one fails alike
            raise RuntimeError(KERNEL_ERROR)
        return real(*args)

    real = score._score
    monkeypatch.setattr(score, "_score", broken)
    f = write_jsonl(tmp_path / "r.jsonl", [{"prompt": f"item {i}"} for i in range(6)])
    out = tmp_path / "labels.jsonl"
    result = process(str(f), "-m", tiny_model, "--choices", "yes,no", "-o", str(out))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: generation failed for 3 rows in a row, each run")
    assert len(calls) == 4  # one scored, three failed, none after


def test_a_row_failing_in_its_prefill_after_a_shared_prefix_is_the_one_recorded(
    tmp_path, tiny_model, monkeypatch
):
    from mlxbatch.pipeline.engine import Engine

    rows = [{"id": r["id"], "text": r["prompt"]} for r in prompts(8)]
    longest = max(len(r["text"].split()) for r in rows)
    [bad] = [r["id"] for r in rows if len(r["text"].split()) == longest]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = [str(f), "-m", tiny_model, "--max-tokens", "3", "--batch-size", "4", "-o", str(out),
            "--template", "{{ text }}", "--system", "You label short texts. " * 8]  # fmt: skip
    real = Engine.prefill_rows
    lengths: list[int] = []  # each row's own tokens after the shared system prompt

    def recorded(self, prefix, suffixes):
        lengths.extend(map(len, suffixes))
        return real(self, prefix, suffixes)

    monkeypatch.setattr(Engine, "prefill_rows", recorded)
    assert process(*args).exit_code == 0
    assert len(lengths) == len(rows)  # every row went through the shared-prefix prefill
    threshold = max(lengths)
    assert sorted(lengths)[-2] < threshold  # only the longest row reaches it

    def failing(self, prefix, suffixes):
        # The longest row's prefill fails, as a row's own error would. It runs last, so at one
        # row a time the row before it is in flight.
        if max(len(s) for s in suffixes) >= threshold:
            raise RuntimeError("bad row")
        return real(self, prefix, suffixes)

    monkeypatch.setattr(Engine, "prefill_rows", failing)
    result = process(*args, "--fresh", "--max-errors", "1")
    assert result.exit_code == 0, result.output
    errors = [r["id"] for r in read_jsonl(out) if r["finish_reason"] == "error"]
    assert errors == [bad]
