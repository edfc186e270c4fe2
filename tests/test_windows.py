"""Windows of rows: the next one is prepared on a worker thread while the current one
generates, and a run in many windows writes what a run in one window writes."""

from __future__ import annotations

import threading
import time

import pytest

from mlxbatch.jobs import windows as windows_module
from mlxbatch.jobs.windows import ReadAhead
from tests.conftest import write_jsonl
from tests.test_cli_process import generated_count, process, prompts


def test_the_next_item_is_made_while_the_caller_holds_the_one_before():
    second_made = threading.Event()
    made_on = []

    def items():
        for i in range(3):
            made_on.append(threading.current_thread().name)
            if i == 1:
                second_made.set()
            yield i

    got = []
    reader = ReadAhead(items())
    for item in reader:
        reader.prepare_next()
        if item == 0:
            # Without reading ahead, item 1 is made only when this loop asks for it.
            assert second_made.wait(timeout=10)
        got.append(item)
    reader.close()
    assert got == [0, 1, 2]
    assert len(set(made_on)) == 1 and made_on[0] != threading.current_thread().name


def test_only_asked_for_and_never_more_than_two_items_alive():
    log = []

    def items():
        for i in range(4):
            log.append(f"make {i}")
            yield i

    reader = ReadAhead(items())
    assert next(reader) == 0
    time.sleep(0.2)  # time for the worker to run on, were it not held back
    assert log == ["make 0"]
    reader.prepare_next()
    reader.prepare_next()
    time.sleep(0.2)
    assert log == ["make 0", "make 1"]
    assert next(reader) == 1
    reader.close()
    assert log == ["make 0", "make 1"]


def test_an_error_making_an_item_is_raised_to_the_caller_in_order():
    def items():
        yield 0
        yield 1
        raise ValueError("row 3 unreadable")

    got = []
    reader = ReadAhead(items())
    with pytest.raises(ValueError, match="row 3 unreadable"):
        for item in reader:
            reader.prepare_next()
            got.append(item)
    reader.close()
    assert got == [0, 1]


def test_closing_early_closes_the_items_on_the_thread_that_made_them():
    closed_on = []

    def items():
        try:
            yield from range(10)
        finally:
            closed_on.append(threading.current_thread().name)

    reader = ReadAhead(items())
    for item in reader:
        reader.prepare_next()
        if item == 2:
            break
    reader.close()  # with item 3 being made: a generator cannot be closed while it runs
    assert closed_on and closed_on[0].startswith("mlxbatch-windows")


@pytest.mark.parametrize("ahead", [True, False])
def test_a_run_in_many_windows_writes_what_one_window_writes(
    tmp_path, tiny_model, monkeypatch, ahead
):
    monkeypatch.setattr(windows_module, "READ_AHEAD", ahead)
    f = write_jsonl(tmp_path / "p.jsonl", prompts(11))
    args = ["-m", tiny_model, "--max-tokens", "3"]
    whole = process(str(f), *args, "-o", str(tmp_path / "whole.jsonl"))
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "windows.jsonl"
    result = process(str(f), *args, "-o", str(out), "--window", "3")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_an_edited_input_in_many_windows_renders_only_its_changed_and_new_rows(
    tmp_path, tiny_model, monkeypatch
):
    rendered = []
    render_tasks = windows_module.render_tasks

    def counting(requests, *args, known_keys, **kwargs):
        rendered.append(len(requests) - len(known_keys))
        return render_tasks(requests, *args, known_keys=known_keys, **kwargs)

    monkeypatch.setattr(windows_module, "render_tasks", counting)
    ahead = []
    prepare_next = windows_module.ReadAhead.prepare_next

    def counting_ahead(self):
        ahead.append(1)
        prepare_next(self)

    monkeypatch.setattr(windows_module.ReadAhead, "prepare_next", counting_ahead)
    f = write_jsonl(tmp_path / "p.jsonl", prompts(7))
    args = ["-m", tiny_model, "--max-tokens", "3", "--window", "3"]
    assert process(str(f), *args).exit_code == 0
    assert rendered == [3, 3, 1] and len(ahead) == 3
    first = (tmp_path / "p.out.jsonl").read_bytes()
    rendered.clear()
    ahead.clear()
    # Row 7 edited, not only appended to: every row is read again (resume.py).
    write_jsonl(f, prompts(6) + [{"id": "r6", "prompt": "an edited row"}] + prompts(4, start=7))
    grown = process(str(f), *args)
    assert generated_count(grown.stderr) == (11, 6)
    # Windows of 3: rows 1-3 and 4-6 were recorded done; rows 7-9 and 10-11 are new.
    assert rendered == [0, 0, 3, 2]
    # Read ahead only while generating: from the window with new rows on.
    assert len(ahead) == 2
    assert (tmp_path / "p.out.jsonl").read_bytes().splitlines()[:6] == first.splitlines()[:6]
