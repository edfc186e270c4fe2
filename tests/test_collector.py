"""The heap alive before a run is frozen while it runs, and handed back to the collector after."""

from __future__ import annotations

import gc
import weakref

from mlxbatch.jobs.collector import frozen_heap
from mlxbatch.pipeline.engine import Engine
from tests.conftest import read_jsonl, write_jsonl
from tests.test_cli_process import process


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_cycles_alive_at_the_start_are_collected_only_after_the_block():
    node = _Node()
    gone = weakref.ref(node)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert gone() is not None  # frozen: out of the collector's reach
        fresh = _Node()
        fresh_gone = weakref.ref(fresh)
        del fresh
        gc.collect()
        assert fresh_gone() is None  # made inside the block: collected as before
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None


def test_objects_frozen_before_the_block_are_frozen_inside_and_handed_back_after():
    # Python 3.12 starts with some objects frozen: the block must not skip freezing for them.
    gc.freeze()
    early = _Node()
    gone = weakref.ref(early)
    with frozen_heap():
        del early
        gc.collect()
        assert gone() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None


def test_a_run_generates_with_the_heap_frozen_and_unfreezes_it(tmp_path, tiny_model, monkeypatch):
    seen: list[int] = []
    generate = Engine.generate

    def recording(self, *args, **kwargs):
        seen.append(gc.get_freeze_count())
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", recording)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello there"}, {"prompt": "a cat"}])
    out = tmp_path / "out.jsonl"
    result = process(str(f), "-m", tiny_model, "--max-tokens", "3", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert len(seen) == 1 and seen[0] > 0
    assert gc.get_freeze_count() == 0
    assert [r["error"] for r in read_jsonl(out)] == [None, None]
