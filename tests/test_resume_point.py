"""A resume of an unchanged input skips its check and never parses the rows that are done
(jobs/resume.py); any change to the input or to what its rows mean brings both back."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlxbatch.jobs import inputs, resume, runner
from mlxbatch.jobs.spec import JobSpec
from mlxbatch.pipeline import read
from tests.conftest import write_jsonl
from tests.test_cli_process import generated_count, process, prompts
from tests.test_faults import run_killed

ARGS = ["--max-tokens", "3", "--batch-size", "2", "--window", "4"]


@pytest.fixture
def counted(monkeypatch):
    """Lines parsed from JSONL, lines skipped unparsed and input checks run, while the test
    runs."""
    seen: dict[str, list] = {"parsed": [], "checks": [], "skipped": []}
    parse_line, check_inputs, skip = read._parse_line, runner.check_inputs, resume.ResumePoint.skip

    def parsing(number, raw):
        seen["parsed"].append(number)
        return parse_line(number, raw)

    def checking(spec):
        seen["checks"].append(spec.input)
        return check_inputs(spec)

    def skipping(point, line):
        skipped = skip(point, line)
        if skipped:
            seen["skipped"].append(line)
        return skipped

    monkeypatch.setattr(read, "_parse_line", parsing)
    monkeypatch.setattr(runner, "check_inputs", checking)
    monkeypatch.setattr(resume.ResumePoint, "skip", skipping)
    return seen


def lines_lacking_results(store: Path) -> list[int]:
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT DISTINCT m.line FROM manifest m LEFT JOIN results r ON r.key = m.key "
            "WHERE r.key IS NULL ORDER BY m.line"
        ).fetchall()
    return [line for (line,) in rows]


def manifest_lines(store: Path) -> int:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT MAX(line) FROM manifest").fetchone()[0]


def crash_then_resume(tmp_path, model, rows, counted, *extra) -> tuple[Path, list[int]]:
    """Kill a run after its third batch is committed; resume it in this process.

    Returns the output and the lines the crashed run left to do (manifest lines lacking a
    result, then the lines it never reached)."""
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "p.out.jsonl"
    args = [str(f), "-o", str(out), "-m", model, *ARGS, *extra, "-q"]
    run_killed(["process", *args], "before_commit:4")
    store = Path(f"{out}.mlxbatch.sqlite")
    todo = lines_lacking_results(store) + list(range(manifest_lines(store) + 1, len(rows) + 1))
    counted["parsed"].clear()
    resumed = process(*args)
    assert resumed.exit_code == 0, resumed.output
    return out, todo


def reference(tmp_path, model, rows, *extra) -> bytes:
    f = write_jsonl(tmp_path / "ref.jsonl", rows)
    result = process(str(f), "-m", model, *ARGS, *extra, "-q")
    assert result.exit_code == 0, result.output
    return (tmp_path / "ref.out.jsonl").read_bytes()


def test_a_resume_parses_only_the_rows_left_to_do_and_checks_nothing(tmp_path, tiny_model, counted):
    rows = prompts(14)
    expected = reference(tmp_path, tiny_model, rows)
    counted["checks"].clear()
    out, todo = crash_then_resume(tmp_path, tiny_model, rows, counted)
    assert 0 < len(todo) < len(rows) - 4
    assert sorted(set(counted["parsed"])) == todo
    assert counted["checks"] == []  # the killed run (a subprocess) recorded its check
    assert out.read_bytes() == expected
    assert 0 < len(counted["skipped"]) < len(rows)
    counted["parsed"].clear()
    counted["skipped"].clear()
    again = process(str(tmp_path / "p.jsonl"), "-o", str(out), "-m", tiny_model, *ARGS)
    assert generated_count(again.stderr) == (14, 14)
    assert counted["parsed"] == [] and counted["checks"] == []
    assert counted["skipped"] == []  # all done: not a line is read


def test_samples_keep_their_numbers_when_a_row_is_read_again(tmp_path, tiny_model, counted):
    rows = prompts(9)
    extra = ("--n", "3", "--temperature", "0.8")
    expected = reference(tmp_path, tiny_model, rows, *extra)
    out, todo = crash_then_resume(tmp_path, tiny_model, rows, counted, *extra)
    assert sorted(set(counted["parsed"])) == todo and len(todo) < len(rows)
    assert out.read_bytes() == expected


def test_parquet_rows_that_are_done_are_not_converted(tmp_path, tiny_model, monkeypatch):
    rows = {"id": [f"r{i}" for i in range(10)], "prompt": [f"{i} cats" for i in range(10)]}
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table(rows), f)
    common = [str(f), "-m", tiny_model, *ARGS, "-q"]
    assert process(*common, "-o", str(tmp_path / "whole.jsonl")).exit_code == 0
    out = tmp_path / "p.out.jsonl"
    run_killed(["process", *common, "-o", str(out)], "before_commit:3")
    store = Path(f"{out}.mlxbatch.sqlite")
    todo = lines_lacking_results(store) + list(range(manifest_lines(store) + 1, 11))
    converted = []
    read_rows = inputs.read_rows

    def reading(path, skip=None, after=(0, 0)):
        for row in read_rows(path, skip, after):
            converted.append(row.line)
            yield row

    monkeypatch.setattr(inputs, "read_rows", reading)
    assert process(*common, "-o", str(out)).exit_code == 0
    assert converted == todo and len(todo) < 10
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    with sqlite3.connect(store) as db:  # a Parquet file does not grow by lines: no ids kept
        names = {name for (name,) in db.execute("SELECT name FROM meta")}
    assert names == {"input_check", "manifest", "export"}


def test_an_edited_input_is_checked_again_and_read_in_full(tmp_path, tiny_model, counted):
    rows = prompts(6)
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    args = [str(f), "-m", tiny_model, *ARGS, "-q"]
    assert process(*args).exit_code == 0
    counted["checks"].clear()
    counted["parsed"].clear()
    rows[2] = {"id": "r2", "prompt": "an edited row"}
    write_jsonl(f, rows)
    edited = process(*args[:-1])
    assert generated_count(edited.stderr) == (6, 5)
    assert len(counted["checks"]) == 1
    # Every line by the check, then by the run (line 1 once more: the check's kind detection).
    assert sorted(counted["parsed"]) == [1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    bad = rows + [{"id": "r2", "prompt": "a duplicate id"}]
    write_jsonl(f, bad)
    refused = process(*args)
    assert refused.exit_code == 1
    assert "duplicate id 'r2'" in refused.stderr


@pytest.mark.parametrize(
    ("flag", "same"),
    [(("--window", "2"), True), (("--batch-size", "5"), True), (("--max-tokens", "4"), False),
     (("--system", "Be brief."), False), (("--seed", "7"), False)],
)  # fmt: skip
def test_the_fingerprint_follows_what_rows_mean_not_how_the_run_goes(tmp_path, flag, same):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    base = JobSpec(input=str(f), model="m")
    changed = JobSpec(input=str(f), model="m", **_spec_values(flag))
    assert (resume.input_fingerprint(base) == resume.input_fingerprint(changed)) is same


def _spec_values(flag: tuple[str, str]) -> dict:
    name, value = flag
    field = name.removeprefix("--").replace("-", "_")
    return {field: int(value) if value.isdigit() else value}


def test_the_fingerprint_covers_the_files_a_check_reads(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object"}))
    spec = JobSpec(input=str(f), model="m", input_schema=str(schema))
    before = resume.input_fingerprint(spec)
    schema.write_text(json.dumps({"type": "object", "required": ["id"]}))
    assert resume.input_fingerprint(spec) != before
    f.write_text(f.read_text() + "\n")  # a trailing blank line changes no row but the bytes
    assert resume.input_fingerprint(spec) != before
    assert resume.input_fingerprint(JobSpec(input=str(tmp_path / "gone.jsonl"))) is None


def test_fresh_ignores_the_recorded_check_and_the_manifest(tmp_path, tiny_model, counted):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(4))
    args = [str(f), "-m", tiny_model, *ARGS]
    assert process(*args, "-q").exit_code == 0
    counted["checks"].clear()
    counted["parsed"].clear()
    fresh = process(*args, "--fresh")
    assert generated_count(fresh.stderr) == (4, 0)
    assert len(counted["checks"]) == 1
    assert sorted(set(counted["parsed"])) == [1, 2, 3, 4] and len(counted["parsed"]) == 9


def test_lines_appended_are_the_only_lines_a_grown_input_reads_again(tmp_path, tiny_model, counted):
    expected = reference(tmp_path, tiny_model, prompts(9))
    f = write_jsonl(tmp_path / "p.jsonl", prompts(6))
    args = [str(f), "-m", tiny_model, *ARGS]
    assert process(*args, "-q").exit_code == 0
    counted["checks"].clear()
    counted["parsed"].clear()
    with open(f, "a", encoding="utf-8") as appending:
        appending.writelines(json.dumps(row) + "\n" for row in prompts(3, start=6))
    grown = process(*args)
    assert generated_count(grown.stderr) == (9, 6)
    assert counted["checks"] == []  # no full check: only the new lines are checked
    assert sorted(counted["parsed"]) == [7, 7, 8, 8, 9, 9]  # by that check, then by the run
    assert counted["skipped"] == []  # lines 1-6 are not even read past: all done
    assert (tmp_path / "p.out.jsonl").read_bytes() == expected
    counted["parsed"].clear()
    with open(f, "a", encoding="utf-8") as appending:  # and again, from the new record
        appending.writelines(json.dumps(row) + "\n" for row in prompts(2, start=9))
    assert generated_count(process(*args).stderr) == (11, 9)
    assert counted["checks"] == [] and sorted(counted["parsed"]) == [10, 10, 11, 11]


@pytest.mark.parametrize(
    ("appended", "message"),
    [({"id": "r1", "prompt": "an old id again"}, "duplicate id 'r1' (first at line 2) (at $.id)"),
     ({"id": "r9", "prompt": "a new id", "temperature": "hot"},
      "'hot' is not of type 'number' (at $.temperature)")],
    ids=["old id", "bad row"],
)  # fmt: skip
def test_a_bad_appended_line_is_reported_by_a_full_check(
    tmp_path, tiny_model, counted, appended, message
):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(6))
    args = [str(f), "-m", tiny_model, *ARGS, "-q"]
    assert process(*args).exit_code == 0
    before = (tmp_path / "p.out.jsonl").read_bytes()
    counted["checks"].clear()
    with open(f, "a", encoding="utf-8") as appending:
        appending.write(json.dumps(appended) + "\n")
    refused = process(*args)
    assert refused.exit_code == 1
    assert refused.stderr == f"{f}:7: {message}\nError: 1 input problem(s); nothing was generated\n"
    assert len(counted["checks"]) == 1  # the same report as a first run's
    assert (tmp_path / "p.out.jsonl").read_bytes() == before


def test_an_appended_input_whose_recorded_ids_are_gone_is_checked_in_full(
    tmp_path, tiny_model, counted
):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(4))
    args = [str(f), "-m", tiny_model, *ARGS, "-q"]
    assert process(*args).exit_code == 0
    with sqlite3.connect(tmp_path / "p.out.jsonl.mlxbatch.sqlite") as db:
        db.execute("UPDATE meta SET value = x'00ff' WHERE name = 'input_ids'")
    counted["checks"].clear()
    with open(f, "a", encoding="utf-8") as appending:
        appending.write(json.dumps({"id": "r1", "prompt": "an old id again"}) + "\n")
    refused = process(*args)
    assert refused.exit_code == 1 and "duplicate id 'r1'" in refused.stderr
    assert len(counted["checks"]) == 1


def test_an_append_to_a_last_line_without_a_newline_reads_every_line(tmp_path, tiny_model, counted):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(row) for row in prompts(4)), encoding="utf-8")
    args = [str(f), "-m", tiny_model, *ARGS]
    assert process(*args, "-q").exit_code == 0
    counted["parsed"].clear()
    with open(f, "a", encoding="utf-8") as appending:
        appending.write("\n" + json.dumps(prompts(1, start=4)[0]) + "\n")
    grown = process(*args)
    assert generated_count(grown.stderr) == (5, 4)
    # The old last line's bytes did not end a line: the manifest is written again.
    assert sorted(set(counted["parsed"])) == [1, 2, 3, 4, 5]
    assert counted["parsed"].count(4) == 2


@pytest.mark.parametrize(
    "change", ["DROP TABLE meta", "UPDATE meta SET value = '12345'"], ids=["before", "garbled"]
)
def test_a_store_whose_records_cannot_be_used_is_checked_and_read_in_full(
    tmp_path, tiny_model, counted, change
):
    f = write_jsonl(tmp_path / "p.jsonl", prompts(3))
    args = [str(f), "-m", tiny_model, *ARGS]
    assert process(*args, "-q").exit_code == 0
    with sqlite3.connect(tmp_path / "p.out.jsonl.mlxbatch.sqlite") as db:
        db.execute(change)
    counted["checks"].clear()
    counted["parsed"].clear()
    again = process(*args)
    assert generated_count(again.stderr) == (3, 3)
    assert len(counted["checks"]) == 1
    assert sorted(counted["parsed"]) == [1, 1, 1, 2, 2, 3, 3]


def test_rows_past_the_manifest_are_read_though_all_before_them_are_done(
    tmp_path, tiny_model, counted
):
    """A run stopped between windows: its manifest ends before the file does."""
    f = write_jsonl(tmp_path / "p.jsonl", prompts(8))
    args = [str(f), "-m", tiny_model, *ARGS, "-q"]
    assert process(*args).exit_code == 0
    expected = (tmp_path / "p.out.jsonl").read_bytes()
    with sqlite3.connect(tmp_path / "p.out.jsonl.mlxbatch.sqlite") as db:
        db.execute("DELETE FROM manifest WHERE line > 4")  # as if the second window never began
    counted["parsed"].clear()
    assert process(*args).exit_code == 0
    assert sorted(counted["parsed"]) == [5, 6, 7, 8]
    assert (tmp_path / "p.out.jsonl").read_bytes() == expected
