"""`--dry-run` (count, calibrate, estimate; write nothing) and `--deadline` (stop, resume)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.jobs import deadline as deadline_module
from mlxbatch.jobs.deadline import Deadline, next_occurrence
from tests.conftest import WORDS, read_jsonl, write_jsonl


def rows(n: int) -> list[dict]:
    return [
        {"id": f"r{i}", "prompt": f"{i}: " + " ".join(WORDS[: 2 + (i * 5) % 13])} for i in range(n)
    ]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_dry_run_counts_and_estimates_without_writing(tmp_path, tiny_model):
    extra = [
        {"id": "n3", "prompt": "three", "n": 3, "temperature": 0.7},  # 3 tasks
        {"id": "bad", "prompt": "x", "tools": 1},  # fails before generation
        {"id": "dup", "prompt": rows(1)[0]["prompt"]},  # the same task as r0: generated once
    ]
    inp = write_jsonl(tmp_path / "p.jsonl", rows(10) + extra)
    before = listing(tmp_path)
    result = invoke("process", str(inp), "-m", tiny_model, "--max-tokens", "7", "--dry-run")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == before  # no output, store, lock, errors or manifest file
    lines = result.stdout.splitlines()
    assert lines[0] == f"dry run of {inp}: nothing generated, nothing written"
    assert lines[1] == (
        "rows: 13 (prompt rows), 15 tasks, 1 already in the store (or duplicates); 13 to generate"
    )
    assert lines[2] == "rows that fail before generation: 1 (1 unsupported_parameter)"
    prompt, new = map(int, re.fullmatch(
        r"tokens: (\d+) prompt to prefill; at most (\d+) to generate", lines[3]).groups())  # fmt: skip
    assert new == 13 * 7
    assert re.fullmatch(
        r"calibration: 8 rows x 8 tokens: prefill \d+ tok/s, decode \d+ tok/s; model load [\d.]+ s",
        lines[4],
    )
    assert lines[5].startswith("estimate: at most ")

    # The prompt tokens are the ones a real run prefills.
    out = tmp_path / "p.out.jsonl"
    assert invoke("process", str(inp), "-m", tiny_model, "--max-tokens", "7", "--max-errors", "1",
                  "-q").exit_code == 0  # fmt: skip
    records = [r for r in read_jsonl(out) if r["error"] is None and r["id"] != "dup"]
    assert prompt == sum(r["usage"]["prompt_tokens"] for r in records)

    # After the run, the store holds everything: nothing left to do, and the store untouched.
    store = listing(tmp_path)
    again = invoke("process", str(inp), "-m", tiny_model, "--max-tokens", "7", "--dry-run")
    assert again.exit_code == 0, again.output
    assert listing(tmp_path) == store
    assert again.stdout.splitlines()[1] == (
        "rows: 13 (prompt rows), 15 tasks, 14 already in the store (or duplicates); 0 to generate"
    )
    assert "estimate: nothing to generate" in again.stdout


def test_dry_run_says_whether_the_deadline_is_met(tmp_path, tiny_model, monkeypatch):
    inp = write_jsonl(tmp_path / "p.jsonl", rows(6))
    args = ("process", str(inp), "-m", tiny_model, "--max-tokens", "5", "--dry-run")
    monkeypatch.setattr(Deadline, "remaining", lambda self: 3 * 3600.0)
    fits = invoke(*args, "--deadline", "06:30")
    assert fits.exit_code == 0
    assert fits.stdout.splitlines()[-1] == "deadline 06:30: in 3h 00m; fits"
    monkeypatch.setattr(Deadline, "remaining", lambda self: 0.0)
    late = invoke(*args, "--deadline", "06:30")
    assert late.exit_code == 0
    assert late.stdout.splitlines()[-1] == (
        "deadline 06:30: in 0.0s; does NOT fit: the run would stop there; run it again to "
        "resume (about 0% done by then)"
    )
    assert not (tmp_path / "p.out.jsonl").exists()


def test_deadline_stops_cleanly_and_the_next_run_resumes(tmp_path, tiny_model, monkeypatch):
    ref = tmp_path / "ref.jsonl"
    inp = write_jsonl(tmp_path / "p.jsonl", rows(40))
    base = ("process", str(inp), "-m", tiny_model, "--max-tokens", "6", "--batch-size", "4")
    assert invoke(*base, "-o", str(ref), "-q").exit_code == 0

    polls = [0]

    def passed(self) -> bool:  # the deadline passes after a few decode steps
        polls[0] += 1
        return polls[0] > 12

    monkeypatch.setattr(Deadline, "passed", passed)
    out = tmp_path / "out.jsonl"
    stopped = invoke(*base, "-o", str(out), "--deadline", "07:00")
    assert stopped.exit_code == 3
    assert stopped.stderr.splitlines()[-1] == (
        "mlxbatch: deadline reached; run again to resume (--deadline 07:00)"
    )
    assert "mlxbatch: interrupted: " in stopped.stderr
    partial = read_jsonl(out)
    assert 0 < len(partial) < 40
    reference = {r["id"]: r for r in read_jsonl(ref)}
    assert all(r == reference[r["id"]] for r in partial)  # finished rows, exactly as they end
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert manifest["rows"]["ok"] == len(partial)
    status = json.loads(invoke("status", str(out), "--json").stdout)
    assert status["last_run"]["status"] == "interrupted"

    monkeypatch.setattr(Deadline, "passed", lambda self: False)
    resumed = invoke(*base, "-o", str(out), "--deadline", "07:00")
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(partial)} cached" in resumed.stderr
    assert out.read_bytes() == ref.read_bytes()
    with sqlite3.connect(f"{out}.mlxbatch.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 40


def test_next_occurrence_is_today_or_tomorrow():
    evening = datetime(2025, 3, 4, 22, 15, 30).timestamp()
    assert datetime.fromtimestamp(next_occurrence("07:00", evening)) == datetime(2025, 3, 5, 7, 0)
    assert datetime.fromtimestamp(next_occurrence("23:59", evening)) == datetime(2025, 3, 4, 23, 59)
    assert datetime.fromtimestamp(next_occurrence("22:15", evening)) == datetime(2025, 3, 5, 22, 15)
    assert datetime.fromtimestamp(next_occurrence("7:05", evening)) == datetime(2025, 3, 5, 7, 5)
    assert Deadline(0.0).passed() and not Deadline(2e9 * 10).passed()
    assert deadline_module.duration(3725) == "1h 02m" and deadline_module.duration(250) == "4m 10s"


@pytest.mark.parametrize("value", ["24:00", "7", "07:60", "noon", "07:00:00"])
def test_bad_deadlines_are_usage_errors(tmp_path, value):
    inp = write_jsonl(tmp_path / "p.jsonl", rows(1))
    result = invoke("process", str(inp), "--deadline", value)
    assert result.exit_code == 2
    assert "is not a time of day as HH:MM" in result.stderr
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {inp}\ndeadline: '{value}'\n")
    assert invoke("process", "--job", str(job)).exit_code == 1
    assert not os.path.exists(tmp_path / "p.out.jsonl")
