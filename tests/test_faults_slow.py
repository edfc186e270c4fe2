"""The long fault sweeps (`make test-faults`, i.e. `pytest -m slow`); criteria as in test_faults.py.

- 20 SIGKILLs of the 300-row job at random moments, each followed by a resume;
- a kill at each commit step for several batches, including the last one and the final export;
- a chain of kills of one job before it is allowed to finish;
- a full disk at every write of a run that re-exports after each batch.

MLXBATCH_FAULT_SEED=<int> replays another random sweep (the seed is in every failure message).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.jobs.faults import FAULTS
from mlxbatch.jobs.store import DISK_FULL_HINT
from tests.conftest import write_jsonl
from tests.test_faults import (
    BATCH,
    POINTS,
    ROWS,
    assert_complete,
    assert_snapshot,
    cli_args,
    invoke,
    litter,
    run_killed,
    summary_counts,
    uninterrupted,
)

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("MLXBATCH_FAULT_SEED", "20240611"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> bytes:
    return uninterrupted(tmp_path_factory.mktemp("reference"), tiny_model)


def committed_now(store: Path) -> int:
    """Rows committed so far, read while the run may still be writing (0 before its tables)."""
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def kill_randomly(args: list[str], store: Path, rng: random.Random) -> tuple[int, int]:
    """Start a run, SIGKILL it at a random moment; return (rows committed before, after)."""
    target = rng.randrange(0, len(ROWS))
    extra_delay = rng.uniform(0, 0.3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxbatch", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while committed_now(store) < target and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    time.sleep(extra_delay)
    seen = committed_now(store)
    proc.send_signal(signal.SIGKILL)
    code = proc.wait(timeout=60)
    assert code in (0, -signal.SIGKILL), proc.stderr.read()
    return seen, committed_now(store)


def test_random_sigkills_resume_to_identical_output(tmp_path, tiny_model, reference):
    rng = random.Random(SEED)
    mid_run = 0
    for i in range(20):
        d = tmp_path / f"run{i}"
        d.mkdir()
        inp = write_jsonl(d / "in.jsonl", ROWS)
        out = d / "out.jsonl"
        store = Path(f"{out}.mlxbatch.sqlite")
        checkpoint = rng.choice(["0", "300"])  # re-export after every batch, or only at the end
        where = f"seed {SEED}, run {i}, --checkpoint-every {checkpoint}"
        seen, done = kill_randomly(
            cli_args(inp, out, tiny_model, "--checkpoint-every", checkpoint, "-q"), store, rng
        )
        assert seen <= done, where  # nothing committed was lost
        assert done % BATCH == 0 or done == len(ROWS), where  # whole batches: rework <= 1 batch
        mid_run += 0 < done < len(ROWS)
        if out.exists():  # whatever was published is whole lines of the final output
            assert_snapshot(out, reference, len(out.read_bytes().splitlines()))
        resumed = invoke(cli_args(inp, out, tiny_model))
        assert resumed.exit_code == 0, (where, resumed.output)
        assert summary_counts(resumed.stderr) == (len(ROWS), done), where
        assert_complete(out, reference, ROWS)
        assert litter(d) == [], where
    assert mid_run >= 10, f"seed {SEED}: only {mid_run} of 20 kills landed mid-run"


@pytest.mark.parametrize("n", [1, 2, 19, 37, 38])
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_at_each_commit_step_sweep(tmp_path, tiny_model, reference, point, n):
    """The n-th batch of 38 (37 of 8 rows, then 4): first, second, middle, last full, last."""
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    store = Path(f"{out}.mlxbatch.sqlite")
    run_killed(cli_args(inp, out, tiny_model, "--checkpoint-every", "0", "-q"), f"{point}:{n}")
    batches = n + POINTS[point]
    done = min(BATCH * batches, len(ROWS))
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == done
    exported = batches if point != "export_tmp" else batches - 1
    assert_snapshot(out, reference, min(BATCH * exported, len(ROWS)))
    resumed = invoke(cli_args(inp, out, tiny_model))
    assert resumed.exit_code == 0, resumed.output
    assert summary_counts(resumed.stderr) == (len(ROWS), done)
    assert_complete(out, reference, ROWS)
    assert litter(tmp_path) == []


@pytest.mark.parametrize("point", ["export_tmp", "after_replace"])
def test_kill_in_the_final_export(tmp_path, tiny_model, reference, point):
    """Without checkpoints the only export is the last: a kill there keeps every row."""
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    run_killed(cli_args(inp, out, tiny_model, "-q"), f"{point}:1")
    if point == "export_tmp":
        assert not out.exists() and len(litter(tmp_path)) == 1
    else:
        assert out.read_bytes() == reference  # published, only the directory fsync was missing
    resumed = invoke(cli_args(inp, out, tiny_model))
    assert resumed.exit_code == 0, resumed.output
    assert summary_counts(resumed.stderr) == (len(ROWS), len(ROWS))  # nothing regenerated
    assert_complete(out, reference, ROWS)
    assert litter(tmp_path) == []


def test_a_chain_of_kills_then_a_finish(tmp_path, tiny_model, reference):
    rng = random.Random(SEED + 1)
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    store = Path(f"{out}.mlxbatch.sqlite")
    args = cli_args(inp, out, tiny_model, "--checkpoint-every", "0", "-q")
    before = 0
    for i in range(6):
        seen, done = kill_randomly(args, store, rng)
        assert before <= seen <= done, (SEED, i)
        assert done % BATCH in (0, len(ROWS) % BATCH), (SEED, i)
        before = done
    resumed = invoke(cli_args(inp, out, tiny_model))
    assert resumed.exit_code == 0, resumed.output
    assert summary_counts(resumed.stderr) == (len(ROWS), before)
    assert_complete(out, reference, ROWS)
    assert litter(tmp_path) == []


def test_disk_full_at_every_write_with_checkpoints(tmp_path, tiny_model):
    """Re-exporting after every batch: at any failing write, the file is a whole snapshot."""
    rows = ROWS[:20]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    assert (
        invoke(
            cli_args(
                write_jsonl(ref_dir / "in.jsonl", rows), ref_dir / "out.jsonl", tiny_model, "-q"
            )
        ).exit_code
        == 0
    )
    reference_bytes = (ref_dir / "out.jsonl").read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    inp = write_jsonl(work / "in.jsonl", rows)
    out = work / "out.jsonl"
    args = cli_args(inp, out, tiny_model, "--batch-size", "4", "--checkpoint-every", "0", "-q")
    failures = collections.Counter()
    for n in range(1, 1000):
        FAULTS.reset()
        result = CliRunner().invoke(
            cli, [*args, "--fresh"], catch_exceptions=False, env={"MLXBATCH_FAULT": f"enospc:{n}"}
        )
        where = FAULTS.fired
        if result.exit_code == 0:
            break
        failures[where.split(":")[0]] += 1
        assert result.exit_code == 1
        assert result.stderr.endswith(f"{DISK_FULL_HINT}\n") and result.stderr.count("\n") == 1, (
            result.stderr
        )
        assert where is not None
        if out.exists():
            assert_snapshot(out, reference_bytes, len(out.read_bytes().splitlines()))
        assert litter(work) == []
        resumed = invoke(args)
        assert resumed.exit_code == 0, resumed.output
        assert_complete(out, reference_bytes, rows)
        out.unlink()
    else:
        pytest.fail("the run never got past the injected full disk")
    # Six exports (5 batches, then the final one), each failing at every write once. Each
    # copies the leading lines an earlier one wrote that are final (rows done in file order,
    # up to the first still pending: batches go by length) and writes the rest, so fewer lines
    # than rewriting every line of every export (4 + 8 + 12 + 16 + 20 + 20 = 80).
    assert failures["fsync"] == 6 and failures["copy"] >= 1
    assert 20 <= failures["line"] < 80
