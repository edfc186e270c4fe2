"""Weights read on several threads: tensors spread by bytes, read once each, the same model."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm.utils
import pytest
from mlx_lm import load

from mlxbatch.pipeline.engine import Engine, ModelLoadError, readers


def test_a_files_tensors_are_spread_over_the_streams_by_bytes(tmp_path):
    sizes = {"a": 700, "b": 300, "c": 300, "d": 250, "e": 100, "f": 50}
    tensors = {
        name: mx.arange(n, dtype=mx.float32) + i for i, (name, n) in enumerate(sizes.items())
    }
    mx.save_safetensors(str(tmp_path / "w.safetensors"), tensors)
    spread = readers.SpreadLoads(mx, [mx.new_thread_unsafe_stream(mx.cpu) for _ in range(3)])
    loaded = spread.load(str(tmp_path / "w.safetensors"))
    assert list(loaded) == list(mx.load(str(tmp_path / "w.safetensors")))
    assert all(mx.array_equal(loaded[k], tensors[k]).item() for k in sizes)
    # Largest first, each to the lightest share: 700 | 300+250 | 300+100+50 elements.
    assert sorted(sum(t.size for t in share) for share in spread.shares) == [450, 550, 700]
    assert sorted(id(t) for s in spread.shares for t in s) == sorted(map(id, loaded.values()))


def test_other_loads_pass_through(tmp_path):
    spread = readers.SpreadLoads(mx, [mx.new_thread_unsafe_stream(mx.cpu)])
    mx.save(str(tmp_path / "x.npy"), mx.ones(3))
    assert mx.array_equal(spread.load(str(tmp_path / "x.npy")), mx.ones(3)).item()
    assert spread.shares == [[]] and spread.zeros is mx.zeros


def test_each_share_is_read_on_its_own_thread_and_tensors_made_into_others_are_not(
    monkeypatch,
):
    streams = [mx.new_thread_unsafe_stream(mx.cpu) for _ in range(3)]
    shares = [[mx.full((4,), i, stream=s) for _ in range(2)] for i, s in enumerate(streams)]
    cast = shares[2][1].astype(mx.float16)  # the model uses the cast, not the tensor
    parameters = [*shares[0], *shares[1], shares[2][0], cast]
    seen: list[tuple[int, int]] = []
    real_eval = mx.eval

    def recording(arrays):
        seen.append((threading.get_ident(), len(arrays)))
        real_eval(arrays)

    monkeypatch.setattr(mx, "eval", recording)
    readers.read(shares, parameters)
    assert len({thread for thread, _ in seen}) == 3
    assert sorted(n for _, n in seen) == [1, 2, 2]
    assert threading.get_ident() in {thread for thread, _ in seen}


def test_a_readers_failure_is_raised_in_the_caller_once_every_reader_is_done(monkeypatch):
    streams = [mx.new_thread_unsafe_stream(mx.cpu) for _ in range(2)]
    shares = [[mx.full((4,), i, stream=s)] for i, s in enumerate(streams)]
    caller = threading.get_ident()
    done: list[int] = []
    real_eval = mx.eval

    def failing_off_the_caller(arrays):
        if threading.get_ident() != caller:
            raise RuntimeError("[load] failed to read: disk gone")
        time.sleep(0.2)  # the caller's own share takes longer than the failure
        real_eval(arrays)
        done.append(caller)

    monkeypatch.setattr(mx, "eval", failing_off_the_caller)
    with pytest.raises(RuntimeError, match="disk gone"):
        readers.read(shares, [t for s in shares for t in s])
    assert done == [caller]


def test_mlx_lm_gets_its_module_back_even_when_the_build_fails():
    with pytest.raises(RuntimeError), readers.spread_loads(mx.cpu):
        assert isinstance(mlx_lm.utils.mx, readers.SpreadLoads)
        raise RuntimeError("bad config")
    assert mlx_lm.utils.mx is mx


@pytest.mark.parametrize("dtype", ["auto", "float16"])
def test_a_model_read_by_four_readers_is_the_model_mlx_lm_loads(tiny_model, monkeypatch, dtype):
    monkeypatch.setattr(readers.os, "cpu_count", lambda: 4)
    reference = load(tiny_model)[0]
    if dtype != "auto":
        reference.set_dtype(getattr(mx, dtype))
    ids = mx.array([[5, 9, 14, 3]])
    model = Engine(tiny_model, dtype=dtype).model
    assert mx.array_equal(model(ids), reference(ids)).item()


def test_a_weights_file_cut_short_is_a_load_error(tmp_path, tiny_model):
    copy = Path(shutil.copytree(tiny_model, tmp_path / "tiny"))
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="exceeding the size of the file"):
        Engine(str(copy)).model  # noqa: B018


def test_one_build_at_a_time_swaps_mlx_lms_module():
    first_in, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def build(entered: threading.Event, hold: bool) -> None:
        with readers.spread_loads(mx.cpu):
            entered.set()
            if hold:
                release.wait(timeout=10)

    first = threading.Thread(target=build, args=(first_in, True))
    first.start()
    assert first_in.wait(timeout=10)
    second = threading.Thread(target=build, args=(second_in, False))
    second.start()
    assert not second_in.wait(timeout=0.3)  # waits for the first build to put mx back
    release.set()
    assert second_in.wait(timeout=10)
    first.join()
    second.join()
    assert mlx_lm.utils.mx is mx


def test_a_model_in_two_weight_files_is_read_whole(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(readers.os, "cpu_count", lambda: 4)
    sharded = Path(shutil.copytree(tiny_model, tmp_path / "sharded"))
    weights = mx.load(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    for i, part in enumerate((names[::2], names[1::2])):
        file = sharded / f"model-0000{i + 1}-of-00002.safetensors"
        mx.save_safetensors(str(file), {n: weights[n] for n in part}, metadata={"format": "mlx"})
    ids = mx.array([[5, 9, 14, 3]])
    assert mx.array_equal(Engine(str(sharded)).model(ids), load(tiny_model)[0](ids)).item()
