"""Faults: kills at each step of a commit, a full disk, changed settings, a damaged store.

The pass criterion everywhere: the final output holds every id exactly once, each line valid
against schemas/output.schema.json, byte-identical to an uninterrupted (greedy) run; a kill
loses at most one batch of finished rows; a failing run says why in one clean line, exits 1,
and leaves the previous output byte-identical. Kills use the MLXBATCH_FAULT hook (store.py) in
a real subprocess, killed with SIGKILL at a marker, never after a sleep. The long sweeps are in
test_faults_slow.py (`make test-faults`).
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.jobs.faults import FAULTS
from mlxbatch.jobs.store import DISK_FULL_HINT
from mlxbatch.schemas import load_schema
from tests.conftest import read_jsonl, write_jsonl

ROWS = [
    {"id": f"row-{i}", "prompt": f"{i} the cat reads " + "an old map " * (i % 9)}
    for i in range(300)
]
BATCH = 8
ARGS = ["--max-tokens", "12", "--batch-size", str(BATCH)]
DAMAGED = "run again with --fresh to start a new store (the damaged file is kept beside it)"
# Commit steps, in order, and how many batches each has committed when it is hit the n-th time.
POINTS = {"before_commit": -1, "in_commit": -1, "export_tmp": 0, "after_replace": 0}


# -- helpers ----------------------------------------------------------------------------------


def cli_args(inp: Path, out: Path, model: str, *extra: str) -> list[str]:
    return ["process", str(inp), "-o", str(out), "-m", model, *ARGS, *extra]


def invoke(args: list[str], env: dict | None = None):
    FAULTS.reset()
    try:
        return CliRunner().invoke(cli, args, catch_exceptions=False, env=env)
    finally:
        FAULTS.reset()


def run_killed(args: list[str], fault: str) -> subprocess.CompletedProcess:
    """Run `mlxbatch` in a subprocess that the MLXBATCH_FAULT hook kills; check it was killed."""
    env = {**os.environ, "MLXBATCH_FAULT": fault}
    proc = subprocess.run(
        [sys.executable, "-m", "mlxbatch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr)
    return proc


def committed(store: Path) -> int:
    if not store.exists():
        return 0
    with sqlite3.connect(store) as db:
        return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def summary_counts(stderr: str) -> tuple[int, int]:
    """(ok, cached) from the run summary."""
    m = re.search(r"mlxbatch: done: (\d+) ok \((\d+) cached\)", stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2))


def assert_complete(out: Path, reference: bytes, rows: list[dict]) -> None:
    """Every id exactly once, every line schema-valid, byte-identical to the reference."""
    records = read_jsonl(out)
    validator = jsonschema.Draft202012Validator(load_schema("output"))
    for record in records:
        validator.validate(record)
    counts = collections.Counter(r["id"] for r in records)
    assert counts == collections.Counter(r.get("id", i + 1) for i, r in enumerate(rows))
    assert set(counts.values()) == {1}
    assert out.read_bytes() == reference


def assert_snapshot(out: Path, reference: bytes, lines: int) -> None:
    """A published partial output: `lines` whole lines of the reference, in its order."""
    got = out.read_bytes().splitlines(keepends=True) if out.exists() else []
    assert len(got) == lines
    ref = reference.splitlines(keepends=True)
    positions = [ref.index(line) for line in got]
    assert positions == sorted(positions)


def litter(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def uninterrupted(d: Path, model: str) -> bytes:
    """The output of the 300-row job run without faults, in directory `d`."""
    inp = write_jsonl(d / "in.jsonl", ROWS)
    result = invoke(cli_args(inp, d / "out.jsonl", model, "-q"))
    assert result.exit_code == 0, result.output
    return (d / "out.jsonl").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> bytes:
    return uninterrupted(tmp_path_factory.mktemp("reference"), tiny_model)


def kill_then_resume(tmp_path: Path, model: str, reference: bytes, point: str, n: int) -> int:
    """Kill the 300-row job at the n-th `point`, check what survived, resume; return committed."""
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    store = Path(f"{out}.mlxbatch.sqlite")
    # --checkpoint-every 0: the output is exported after every batch, so every export step is hit.
    run_killed(cli_args(inp, out, model, "--checkpoint-every", "0", "-q"), f"{point}:{n}")
    batches = n + POINTS[point]
    done = committed(store)
    assert done == BATCH * batches  # whole batches only: at most one batch of rework
    exported = batches if point != "export_tmp" else batches - 1
    assert_snapshot(out, reference, BATCH * exported)
    resumed = invoke(cli_args(inp, out, model))
    assert resumed.exit_code == 0, resumed.output
    assert summary_counts(resumed.stderr) == (len(ROWS), done)  # nothing committed is redone
    assert_complete(out, reference, ROWS)
    assert litter(tmp_path) == []  # a killed export's temp file is cleaned up by the next one
    return done


# -- 2. a kill at each step of the commit --------------------------------------------------------


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_at_each_commit_step(tmp_path, tiny_model, reference, point):
    kill_then_resume(tmp_path, tiny_model, reference, point, 3)


def test_rework_after_a_kill_is_at_most_one_batch(tmp_path, tiny_model, monkeypatch):
    """At every moment, finished-but-uncommitted results are fewer than one batch."""
    import mlxbatch.pipeline.engine as engine
    from mlxbatch.jobs.store import Store

    produced, commits, worst = [0], [], [0]
    generate, put_results = engine.Engine.generate, Store.put_results

    def spy_generate(self, tasks, *, on_result, **kw):
        def counted(result):
            produced[0] += 1
            worst[0] = max(worst[0], produced[0] - sum(commits))
            on_result(result)

        return generate(self, tasks, on_result=counted, **kw)

    def spy_put(self, results):
        put_results(self, results)
        commits.append(len(results))

    monkeypatch.setattr(engine.Engine, "generate", spy_generate)
    monkeypatch.setattr(Store, "put_results", spy_put)
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:100])
    assert invoke(cli_args(inp, tmp_path / "out.jsonl", tiny_model, "-q")).exit_code == 0
    assert produced[0] == sum(commits) == 100
    assert max(commits) <= BATCH
    assert worst[0] <= BATCH  # the BATCH-th result triggers the commit that holds it


# -- 3. a full disk ----------------------------------------------------------------------------


def test_disk_full_at_every_write_keeps_the_old_output_and_resumes(tmp_path, tiny_model):
    """ENOSPC at the n-th store or output write, for every n: clean error, old file untouched."""
    rows = ROWS[:10]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_in = write_jsonl(ref_dir / "in.jsonl", rows)
    assert invoke(cli_args(ref_in, ref_dir / "out.jsonl", tiny_model, "-q")).exit_code == 0
    reference = (ref_dir / "out.jsonl").read_bytes()

    work = tmp_path / "work"
    work.mkdir()
    inp = write_jsonl(work / "in.jsonl", rows[:6])
    out = work / "out.jsonl"
    store = f"{out}.mlxbatch.sqlite"
    args = cli_args(inp, out, tiny_model, "--batch-size", "4", "-q")
    assert invoke(args).exit_code == 0
    write_jsonl(inp, rows)  # the input grew; the next run has new rows to generate and export
    fired = []
    for n in range(1, 200):
        FAULTS.reset()
        previous = out.read_bytes()
        result = CliRunner().invoke(
            cli, args, catch_exceptions=False, env={"MLXBATCH_FAULT": f"enospc:{n}"}
        )
        where = FAULTS.fired
        if result.exit_code == 0:
            assert where is None
            break
        fired.append(where.split(":")[0] + ":" + where.split(":")[1].rsplit("/", 1)[-1])
        assert result.exit_code == 1
        if where.startswith("store:"):
            assert (
                result.stderr
                == f"Error: {store}: No space left on device (database or disk is full); {DISK_FULL_HINT}\n"
            )
        else:
            assert result.stderr == f"Error: {out}: No space left on device; {DISK_FULL_HINT}\n"
        assert out.read_bytes() == previous  # untouched, also when recording the run fails
        assert litter(work) == []
        assert not Path(f"{out}.errors.jsonl").exists()
        FAULTS.reset()
        resumed = invoke(args)  # space is back
        assert resumed.exit_code == 0, resumed.output
        assert_complete(out, reference, rows)
        write_jsonl(inp, rows[:6])  # back to the old input and output for the next n
        assert invoke(args + ["--fresh"]).exit_code == 0
        write_jsonl(inp, rows)
    else:
        pytest.fail("the run never got past the injected full disk")
    kinds = collections.Counter(fired)
    assert {
        "store:begin_run",
        "store:add_manifest",
        "store:record_done",
        "store:put_results",
        "copy:out.jsonl",
        "line:out.jsonl",
        "fsync:out.jsonl",
        "store:end_run",
    } <= set(kinds)
    # The first run's 6 lines are final: they are copied whole, and only the new ones written.
    assert kinds["store:put_results"] == 1 and kinds["copy:out.jsonl"] == 1
    assert kinds["line:out.jsonl"] == len(rows) - 6


def test_disk_full_writing_parquet_keeps_the_old_file(tmp_path, tiny_model):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:5])
    out = tmp_path / "out.parquet"
    args = cli_args(inp, out, tiny_model, "-q")
    assert invoke(args).exit_code == 0
    previous = out.read_bytes()
    write_jsonl(inp, ROWS[:9])
    # begin_run, set_meta (the input check), clear_manifest (the input grew), add_manifest,
    # record_done, put_results (4 new rows), end_run: then Parquet.
    first_parquet_write = 8
    result = invoke(args, env={"MLXBATCH_FAULT": f"enospc:{first_parquet_write}"})
    assert result.exit_code == 1
    assert result.stderr == f"Error: {out}: No space left on device; {DISK_FULL_HINT}\n"
    assert out.read_bytes() == previous
    assert litter(tmp_path) == []
    assert invoke(args).exit_code == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out).column("id").to_pylist() == [r["id"] for r in ROWS[:9]]


def test_real_sqlite_full_mid_run(tmp_path, tiny_model, monkeypatch):
    """SQLite's own "database or disk is full" (max_page_count), in the middle of the batches."""
    from mlxbatch.jobs.store import Store

    ref = tmp_path / "ref.jsonl"
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:200])
    assert invoke(cli_args(inp, ref, tiny_model, "-q")).exit_code == 0
    write_jsonl(inp, ROWS[:40])
    out = tmp_path / "out.jsonl"
    store = Path(f"{out}.mlxbatch.sqlite")
    assert invoke(cli_args(inp, out, tiny_model, "-q")).exit_code == 0
    previous = out.read_bytes()
    write_jsonl(inp, ROWS[:200])

    add_manifest = Store.add_manifest

    def then_fill_the_disk(self, tasks):
        add_manifest(self, tasks)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {pages + 2}")  # room for a few batches only

    monkeypatch.setattr(Store, "add_manifest", then_fill_the_disk)
    result = invoke(cli_args(inp, out, tiny_model, "-q"))
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"Error: {store}: No space left on device (database or disk is full); {DISK_FULL_HINT}\n"
    )
    assert out.read_bytes() == previous
    assert 40 < committed(store) < 200  # it failed mid-generation, after some batches
    monkeypatch.setattr(Store, "add_manifest", add_manifest)
    assert invoke(cli_args(inp, out, tiny_model, "-q")).exit_code == 0
    assert_complete(out, ref.read_bytes(), ROWS[:200])


# -- 7. resume with changed settings --------------------------------------------------------------


def status_lines(out: Path) -> list[str]:
    result = CliRunner().invoke(cli, ["status", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def manifest_keys(store: Path) -> set[str]:
    with sqlite3.connect(store) as db:
        return {r[0] for r in db.execute("SELECT key FROM manifest")}


@pytest.mark.parametrize("change", ["params", "template", "model"])
def test_changed_settings_regenerate_and_status_says_so(
    tmp_path, tiny_model, short_context_model, change
):
    n = 40
    if change == "template":
        rows = [{"text": f"{i} green apples " * (1 + i % 3)} for i in range(n)]
        old = ["--template", "Say {{ text }}", "--max-tokens", "6"]
        new = ["--template", "Tell me {{ text }}", "--max-tokens", "6"]
        diff = 'template "Say {{ text }}" -> "Tell me {{ text }}"'
    elif change == "model":
        rows = ROWS[:n]
        old = ["--max-tokens", "6"]
        new = ["--max-tokens", "6", "-m", short_context_model]
        diff = f"model {json.dumps(tiny_model)} -> {json.dumps(short_context_model)}"
    else:
        rows = ROWS[:n]
        old, new = ["--max-tokens", "6"], ["--max-tokens", "4"]
        diff = "max_tokens 6 -> 4"

    def args(inp: Path, out: Path, settings: list[str]) -> list[str]:
        return [
            "process",
            str(inp),
            "-o",
            str(out),
            "-m",
            tiny_model,
            "--batch-size",
            "4",
            "-q",
            *settings,
        ]

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_in = write_jsonl(ref_dir / "in.jsonl", rows)
    assert invoke(args(ref_in, ref_dir / "out.jsonl", new)).exit_code == 0
    reference = (ref_dir / "out.jsonl").read_bytes()

    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    store = Path(f"{out}.mlxbatch.sqlite")
    assert invoke(args(inp, out, old)).exit_code == 0
    old_keys = manifest_keys(store)
    run_killed(args(inp, out, new), "before_commit:3")  # two batches of the new settings done
    lines = status_lines(out)
    assert lines[1] == f"rows: {n} total, 8 done, 0 failed, {n - 8} pending"
    assert re.fullmatch(
        r"last run: #2 did not finish \(killed or crashed; run the same command again to resume\), started .*, pid \d+",
        lines[3],
    )
    assert (
        lines[-2]
        == f"results: 8 for these rows and settings, {n} from other settings or rows (not used; --fresh drops them)"
    )
    assert lines[-1] == f"settings changed since run #1: {diff}"
    status = json.loads(CliRunner().invoke(cli, ["status", str(out), "--json"]).stdout)
    assert status["results"] == {"current": 8, "other": n}
    assert status["last_run"]["state"] == "died"
    assert list(status["changed"]) == [diff.split()[0]]

    resumed = invoke(args(inp, out, new))
    assert resumed.exit_code == 0, resumed.output
    assert out.read_bytes() == reference  # every row from the new settings, none from the old
    assert manifest_keys(store).isdisjoint(old_keys)
    assert committed(store) == 2 * n
    lines = status_lines(out)
    assert (
        lines[-1]
        == f"results: {n} for these rows and settings, {n} from other settings or rows (not used; --fresh drops them)"
    )
    assert re.fullmatch(r"last run: #3 completed, started .*, pid \d+", lines[3])


# -- 8. a damaged store ----------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path, tiny_model):
    """A finished 24-row job: (args, output, store, output bytes)."""
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:24])
    out = tmp_path / "out.jsonl"
    args = cli_args(inp, out, tiny_model, "-q")
    assert invoke(args).exit_code == 0
    return args, out, Path(f"{out}.mlxbatch.sqlite"), out.read_bytes()


def assert_damage_reported(
    args: list[str], out: Path, store: Path, reference: bytes, why: str, at_open: bool = True
) -> None:
    """process, status and export each fail with the same clean line; --fresh recovers.

    `at_open`: the damage is found when the store opens (SQLite's integrity check), so --fresh
    moves the file aside; damage inside row text is found when the rows are read, and --fresh
    then drops those rows instead. A finished job's process run reads no row it exported as
    final (jobs/output_prefix.py): it finds no damage there and leaves the output as it is.
    """
    message = f"Error: {store}: the store is damaged ({why}); {DAMAGED}\n"
    commands = [["export", str(out), "--to", str(out.parent / "x.jsonl")]]
    if at_open:  # status reads no row text
        commands += [args, ["status", str(out)]]
    else:
        assert invoke(args).exit_code == 0
    for cmd in commands:
        result = invoke(cmd)
        assert (result.exit_code, result.stderr) == (1, message)
    assert out.read_bytes() == reference
    assert not (out.parent / "x.jsonl").exists() and litter(out.parent) == []
    fresh = invoke([*args, "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    assert out.read_bytes() == reference
    assert len(list(out.parent.glob(f"{store.name}.corrupt-*"))) == (1 if at_open else 0)
    assert invoke(["status", str(out)]).exit_code == 0


def test_truncated_store(finished):
    args, out, store, reference = finished
    os.truncate(store, store.stat().st_size // 2)
    assert_damage_reported(args, out, store, reference, "database disk image is malformed")


def test_store_with_a_damaged_page(finished):
    args, out, store, reference = finished
    with sqlite3.connect(store) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'results'").fetchone()[0]
    with open(store, "r+b") as f:  # garbage over the results table's b-tree page header
        f.seek((root - 1) * page_size)
        f.write(b"\x0d\x00\x00\xff\xff" + b"\xa5" * 27)
    assert_damage_reported(args, out, store, reference, "database disk image is malformed")


def test_store_with_damaged_text(finished):
    """Bytes that SQLite's page checks cannot see (no page checksums) still fail cleanly."""
    args, out, store, reference = finished
    data = store.read_bytes()
    assert data.count(b"length") == 24
    store.write_bytes(data.replace(b"length", b"\xffength"))
    why = "Could not decode to UTF-8 column 'finish_reason' with text '\ufffdength'"
    assert_damage_reported(args, out, store, reference, why, at_open=False)
