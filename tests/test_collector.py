"""While a run goes on the collector makes no full collections; afterwards it does as before."""

from __future__ import annotations

import gc

from mlxbatch.jobs.collector import YOUNG_THRESHOLD, young_collections_only
from mlxbatch.pipeline.engine import Engine
from tests.conftest import read_jsonl, write_jsonl
from tests.test_cli_process import process


def _generations_collected(work) -> set[int]:
    seen: set[int] = set()

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            seen.add(info["generation"])

    gc.callbacks.append(callback)
    try:
        work()
    finally:
        gc.callbacks.remove(callback)
    return seen


def _allocate() -> None:
    # Enough surviving containers for the collector's default schedule to reach a full
    # collection: it waits until the objects promoted since the last one are a quarter of
    # those it kept then, whatever the process holds.
    kept = [[i] for i in range(300_000 + len(gc.get_objects()) // 2)]
    del kept


def test_only_young_generations_are_collected_inside_the_block():
    before = gc.get_threshold()
    assert 2 in _generations_collected(_allocate)  # the default schedule makes full ones
    with young_collections_only():
        inside = _generations_collected(_allocate)
    assert inside and 2 not in inside
    assert gc.get_threshold() == before


def test_a_run_generates_with_young_collections_only_and_puts_the_thresholds_back(
    tmp_path, tiny_model, monkeypatch
):
    seen: list[tuple[int, int, int]] = []
    generate = Engine.generate

    def recording(self, *args, **kwargs):
        seen.append(gc.get_threshold())
        return generate(self, *args, **kwargs)

    before = gc.get_threshold()
    monkeypatch.setattr(Engine, "generate", recording)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello there"}, {"prompt": "a cat"}])
    out = tmp_path / "out.jsonl"
    result = process(str(f), "-m", tiny_model, "--max-tokens", "3", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert len(seen) == 1 and seen[0][2] > 10**8 and seen[0][0] >= YOUNG_THRESHOLD > before[0]
    assert gc.get_threshold() == before
    assert [r["error"] for r in read_jsonl(out)] == [None, None]
