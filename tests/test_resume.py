"""Real `mlxbatch process` subprocesses, killed mid-run: nothing lost, nothing repeated."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, write_jsonl

ROWS = [
    {"id": f"row-{i}", "prompt": f"{i} the cat reads " + "an old map " * (i % 9)}
    for i in range(300)
]
ARGS = ["--max-tokens", "12", "--batch-size", "8", "-q"]


def start(inp: Path, out: Path, model: str, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "mlxbatch",
        "process",
        str(inp),
        "-o",
        str(out),
        "-m",
        model,
        *ARGS,
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def committed(store: Path) -> int:
    try:
        with sqlite3.connect(store, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> bytes:
    d = tmp_path_factory.mktemp("reference")
    inp = write_jsonl(d / "in.jsonl", ROWS)
    proc = start(inp, d / "out.jsonl", tiny_model)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return (d / "out.jsonl").read_bytes()


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGKILL, -9), (signal.SIGINT, 130), (signal.SIGTERM, 143)]
)
def test_killed_run_resumes_to_identical_output(tmp_path, tiny_model, reference, sig, code):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    store = Path(f"{out}.mlxbatch.sqlite")
    proc = start(inp, out, tiny_model)
    wait_for(lambda: committed(store) >= 40)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code, proc.stderr.read()
    done = committed(store)
    assert 40 <= done < len(ROWS)
    if sig != signal.SIGKILL:
        # A clean stop exports what is finished: every committed row, valid, in input order.
        partial = read_jsonl(out)
        assert len(partial) == done
        ids = [r["id"] for r in partial]
        assert ids == sorted(ids, key=lambda i: int(i.split("-")[1]))
    resumed = start(inp, out, tiny_model)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert out.read_bytes() == reference
    ids = [r["id"] for r in read_jsonl(out)]
    assert ids == [r["id"] for r in ROWS]


def test_second_run_on_same_store_is_refused(tmp_path, tiny_model):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    store = Path(f"{out}.mlxbatch.sqlite")
    first = start(inp, out, tiny_model)
    try:
        wait_for(lambda: committed(store) >= 1)
        # Paused, so that it still holds the store however fast the device finishes a run.
        first.send_signal(signal.SIGSTOP)
        second = start(inp, out, tiny_model)
        assert second.wait(timeout=60) == 1
        err = second.stderr.read()
        assert err == (
            f"Error: {store} is in use by another mlxbatch process (pid {first.pid}); "
            "wait for it to finish or stop it\n"
        )
        # `export` reads the store while the run holds it.
        snapshot = tmp_path / "snapshot.jsonl"
        exported = subprocess.run(
            [sys.executable, "-m", "mlxbatch", "export", str(out), "--to", str(snapshot)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert exported.returncode == 0, exported.stderr
        assert len(read_jsonl(snapshot)) >= 1
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the dead run's lock: the next run takes the store over.
    again = start(inp, out, tiny_model)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert len(read_jsonl(out)) == len(ROWS)


def test_lock_file_names_pid(tmp_path):
    from mlxbatch.jobs.store import Store

    store = Store(str(tmp_path / "s.sqlite"))
    store.lock()
    assert Path(f"{tmp_path / 's.sqlite'}.lock").read_text() == str(os.getpid())
    store.close()


def test_checkpoint_exports_partial_output_during_a_run(tmp_path, tiny_model):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    store = Path(f"{out}.mlxbatch.sqlite")
    proc = start(inp, out, tiny_model, "--checkpoint-every", "0")
    wait_for(lambda: committed(store) >= 60)
    proc.kill()
    proc.wait()
    # The last checkpoint is a whole file: every line complete, finished rows in input order.
    partial = read_jsonl(out)
    assert 8 <= len(partial) <= committed(store)
    order = [int(r["id"].split("-")[1]) for r in partial]
    assert order == sorted(order)


def test_sampled_run_killed_and_resumed_matches_an_uninterrupted_one(tmp_path, tiny_model):
    sampled = ("--temperature", "0.9", "-n", "2", "--top-p", "0.9")
    rows = ROWS[:120]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_in = write_jsonl(ref_dir / "in.jsonl", rows)
    ref = start(ref_in, ref_dir / "out.jsonl", tiny_model, *sampled)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = start(inp, out, tiny_model, *sampled)
    wait_for(lambda: committed(Path(f"{out}.mlxbatch.sqlite")) >= 40)
    proc.kill()
    proc.wait()
    resumed = start(inp, out, tiny_model, *sampled)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert out.read_bytes() == (ref_dir / "out.jsonl").read_bytes()
