"""Generation on a Ray cluster: same output as a local run, exactly once, workers may die.

The cluster tests start a local Ray (`ray.init(num_cpus=2)`, with two `mlx` units) on this
machine with the tiny model, and are skipped when Ray (`pip install 'mlxbatch[ray]'`) is not installed. The chunking,
retry and option tests need no Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from mlxbatch.jobs.chunks import (
    MAX_CHUNK_FAILURES,
    MAX_CHUNK_ROWS,
    Chunk,
    after_failure,
    split_chunks,
)
from mlxbatch.jobs.ray_connect import RayExecutorError, worker_plan
from mlxbatch.jobs.ray_executor import RayPool
from mlxbatch.jobs.runner import run_job
from mlxbatch.jobs.spec import JobSpec, build_spec, load_job_file
from mlxbatch.jobs.store import Store
from mlxbatch.records import GenParams, InputProblems, Task
from tests.conftest import read_jsonl, write_jsonl

ROWS = [
    {"id": f"row-{i}", "prompt": f"{i} the cat reads " + "an old map " * (i % 9)} for i in range(40)
]
MAX_TOKENS = 8


def task(i: int, length: int) -> Task:
    return Task(
        key=f"k{i}",
        seq=i,
        line=i + 1,
        id=i,
        sample_index=0,
        prompt_ids=list(range(length)),
        params=GenParams(),
    )


# -- no Ray needed ---------------------------------------------------------------------------


def test_chunks_are_length_sorted_and_cover_every_task_once():
    tasks = [task(i, 1 + (i * 7) % 23) for i in range(101)]
    chunks = split_chunks(tasks, workers=3, first_id=10)
    assert [c.id for c in chunks] == list(range(10, 10 + len(chunks)))
    flat = [t for c in chunks for t in c.tasks]
    assert sorted(t.key for t in flat) == sorted(t.key for t in tasks)
    lengths = [len(t.prompt_ids) for t in flat]
    assert lengths == sorted(lengths)
    assert len(chunks) == 12  # about CHUNKS_PER_WORKER per worker: 101 rows in chunks of 9
    big = split_chunks([task(i, 3) for i in range(5000)], workers=1)
    assert max(len(c.tasks) for c in big) == MAX_CHUNK_ROWS


def test_a_chunk_that_keeps_killing_workers_shrinks_to_one_error_row():
    ids = iter(range(100, 200))
    chunk = Chunk(7, [task(i, 4) for i in range(4)])
    again, errors = after_failure(chunk, "killed", lambda: next(ids))
    assert errors == [] and len(again) == 1
    assert (again[0].id, again[0].failures) == (7, 1)  # retried once as it is
    halves, errors = after_failure(again[0], "killed", lambda: next(ids))
    assert errors == [] and [len(c.tasks) for c in halves] == [2, 2]
    assert all(c.failures == MAX_CHUNK_FAILURES - 1 for c in halves)
    assert {c.id for c in halves} == {100, 101}
    quarters, _ = after_failure(halves[0], "killed", lambda: next(ids))
    assert [[t.key for t in c.tasks] for c in quarters] == [["k0"], ["k1"]]
    again, errors = after_failure(quarters[0], "killed again", lambda: next(ids))
    assert again == []
    assert [(e.key, e.finish_reason, e.error_code) for e in errors] == [
        ("k0", "error", "worker_died")
    ]
    assert "killed again" in (errors[0].error_message or "")


def test_job_file_chooses_the_executor(tmp_path):
    def spec(text: str) -> JobSpec:
        path = tmp_path / "job.yaml"
        path.write_text(text, encoding="utf-8")
        return build_spec(load_job_file(str(path)), {})

    assert spec("input: in.jsonl\n").ray_address is None
    assert spec("input: in.jsonl\nexecutor: ray\n").ray_address == "auto"
    ray_job = spec("input: in.jsonl\nray: 10.1.2.3:6379\nray_workers: 3\n")
    assert (ray_job.ray_address, ray_job.ray_workers) == ("10.1.2.3:6379", 3)
    assert spec("input: in.jsonl\nexecutor: local\nray: h:6379\n").ray_address is None
    with pytest.raises(InputProblems):
        spec("input: in.jsonl\nexecutor: slurm\n")
    with pytest.raises(InputProblems):
        spec("input: in.jsonl\nray_workers: 0\n")


def test_ray_option_rejects_what_is_not_an_address(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    # `--ray INPUT` would take INPUT as the address: said plainly, before any model loads.
    result = CliRunner().invoke(cli, ["process", "--ray", str(inp), "-m", "no/such-model"])
    assert result.exit_code == 2
    assert "is not a Ray address" in result.output and "INPUT before --ray" in result.output
    result = CliRunner().invoke(cli, ["process", str(inp), "--ray", "--ray-workers", "0"])
    assert result.exit_code == 2


def test_missing_ray_is_reported_with_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ray" else real_find_spec(name, *a),
    )
    result = CliRunner().invoke(cli, ["process", str(inp), "--ray"])
    assert result.exit_code == 2
    assert "pip install 'mlxbatch[ray]'" in result.output
    # A job file's `executor: ray` reaches the pool, which says the same.
    monkeypatch.setitem(sys.modules, "ray", None)
    pool = RayPool(JobSpec(input=str(inp), executor="ray"))
    with pytest.raises(RayExecutorError, match=r"pip install 'mlxbatch\[ray\]'"):
        pool.generate_window([task(0, 3)], pool.spec, _Identity(), print, lambda: False)


class _Identity:
    identity = "x"


class FakeRay:
    def __init__(self, resources: dict, alive_nodes: int):
        self.resources, self.alive_nodes = resources, alive_nodes

    def cluster_resources(self) -> dict:
        return self.resources

    def nodes(self) -> list[dict]:
        return [{"Alive": True}] * self.alive_nodes + [{"Alive": False}]


@pytest.mark.parametrize(
    "resources, nodes, requested, count, needs",
    [
        ({"CPU": 32.0, "mlx": 3.0}, 3, None, 3, {"resources": {"mlx": 1}}),
        ({"CPU": 64.0, "GPU": 8.0}, 1, None, 8, {"num_gpus": 1}),
        ({"CPU": 16.0}, 4, None, 4, {"num_cpus": 1}),
        ({"CPU": 16.0}, 4, 6, 6, {"num_cpus": 1}),
        ({"CPU": 16.0, "GPU": 2.0}, 1, 1, 1, {"num_gpus": 1}),
    ],
)
def test_one_worker_per_mlx_unit_else_gpu_else_machine(resources, nodes, requested, count, needs):
    got, options = worker_plan(FakeRay(resources, nodes), requested)
    assert got == count
    assert options == {**needs, "scheduling_strategy": "SPREAD"}


# -- a local Ray cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports sent anywhere
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # A cluster of its own ("local"), even where `ray start` runs one on this machine.
    # Two "mlx" units, as two Macs started with --resources='{"mlx": 1}' would give.
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",  # loopback only: nothing leaves this machine
        include_dashboard=False,
        num_cpus=2,
        resources={"mlx": 2},
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    for s, handler in handlers.items():  # ray.init takes SIGTERM over
        signal.signal(s, handler)
    yield ray
    ray.shutdown()


def run(tmp_path: Path, model: str, name: str, **options) -> tuple:
    inp = tmp_path / "in.jsonl"
    if not inp.exists():
        write_jsonl(inp, ROWS)
    out = tmp_path / f"{name}.jsonl"
    spec = JobSpec(
        input=str(inp), output=str(out), model=model, max_tokens=MAX_TOKENS, quiet=True, **options
    )
    return run_job(spec), out


def committed(out: Path) -> int:
    with sqlite3.connect(f"{out}.mlxbatch.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def worker_pids(ray) -> dict[str, int]:
    pids = {}
    for name in ray.util.list_named_actors():
        if name.startswith("mlxbatch-worker-"):
            actor = ray.get_actor(name)
            info = ray.get(actor.info.options(concurrency_group="control").remote())
            pids[name] = info["pid"]
    return pids


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> bytes:
    summary, out = run(tmp_path_factory.mktemp("local"), tiny_model, "local")
    assert summary.ok == len(ROWS)
    return out.read_bytes()


def test_ray_run_gives_the_local_output(ray_cluster, tmp_path, tiny_model, reference, monkeypatch):
    summary, out = run(tmp_path, tiny_model, "out", ray="auto")  # one worker per mlx unit
    assert out.read_bytes() == reference
    assert (summary.ok, summary.failed, summary.cached) == (len(ROWS), 0, 0)
    assert committed(out) == len(ROWS)
    assert worker_pids(ray_cluster) == {}  # the workers end with the run
    # A finished job has nothing to generate: it does not even start the workers.
    monkeypatch.setattr(RayPool, "_start", lambda *a: pytest.fail("Ray workers started"))
    again, _ = run(tmp_path, tiny_model, "out", ray="auto", ray_workers=2)
    assert (again.ok, again.cached) == (0, len(ROWS))
    assert out.read_bytes() == reference


def test_killed_worker_loses_only_its_chunk(
    ray_cluster, tmp_path, tiny_model, reference, monkeypatch, caplog
):
    killed: list[int] = []
    put_results = Store.put_results

    def put_then_kill(self, results):
        put_results(self, results)
        if not killed:  # rows are committed: kill a worker in the middle of its chunk
            pid = sorted(worker_pids(ray_cluster).items())[0][1]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    monkeypatch.setattr(Store, "put_results", put_then_kill)
    with caplog.at_level(logging.WARNING, logger="mlxbatch.ray"):
        summary, out = run(tmp_path, tiny_model, "out", ray="auto", ray_workers=2)
    assert killed
    assert any("died" in r.message and "reissuing" in r.message for r in caplog.records)
    # Every id exactly once, each committed once (ok counts commits), as a local run writes it.
    assert (summary.ok, summary.failed, summary.cached) == (len(ROWS), 0, 0)
    assert committed(out) == len(ROWS)
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in ROWS]
    assert out.read_bytes() == reference


def test_interrupted_ray_run_commits_what_returned_and_resumes(
    ray_cluster, tmp_path, tiny_model, reference, monkeypatch
):
    put_results = Store.put_results
    signalled: list[bool] = []

    def put_then_interrupt(self, results):
        put_results(self, results)
        if not signalled:
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does to the driver

    monkeypatch.setattr(Store, "put_results", put_then_interrupt)
    summary, out = run(tmp_path, tiny_model, "out", ray="auto", ray_workers=2)
    monkeypatch.setattr(Store, "put_results", put_results)
    assert (summary.status, summary.signal) == ("interrupted", signal.SIGINT)
    done = committed(out)
    assert 1 <= done < len(ROWS) and summary.ok == done
    partial = read_jsonl(out)  # exported: every committed row, in input order
    assert len(partial) == done
    order = [r["id"] for r in ROWS]
    assert [r["id"] for r in partial] == sorted((r["id"] for r in partial), key=order.index)
    resumed, _ = run(tmp_path, tiny_model, "out", ray="auto", ray_workers=2)
    assert (resumed.ok, resumed.cached) == (len(ROWS) - done, done)
    assert out.read_bytes() == reference


def test_cli_attaches_to_a_running_cluster(ray_cluster, tmp_path, tiny_model, reference):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "mlxbatch", "process", str(inp), "-o", str(out), "-m", tiny_model]
    cmd += ["--max-tokens", str(MAX_TOKENS), "-q", "--ray", address, "--ray-workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == reference
