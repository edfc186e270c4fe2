"""`mlxbatch export --format`: fine-tuning sets that mlx-lm's own dataset loader reads."""

from __future__ import annotations

import hashlib
import json
import os
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxbatch.cli import cli
from tests.conftest import WORDS, read_jsonl, write_jsonl

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [SYSTEM, {"role": "user", "content": "hello there"}]
MULTI = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "count to three"},
]


def rows() -> list[dict]:
    out: list[dict] = [
        {"id": f"q{i}", "prompt": f"question {i}: " + " ".join(WORDS[: 2 + (i * 5) % 13])}
        for i in range(24)
    ]
    out += [
        {"id": "chat", "messages": CHAT},
        {"id": "multi", "messages": MULTI},
        {"id": "bad", "prompt": "x", "temprature": 1},  # fails: unsupported parameter
        {"id": "dupA", "prompt": "same words"},
        {"id": "dupB", "prompt": "same words"},  # same prompt, same greedy output: a duplicate
        {"id": "label", "prompt": "pick one", "choices": ["yes", "no"]},  # finishes with "stop"
    ]
    return out


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("lora")
    inp = write_jsonl(d / "in.jsonl", rows())
    out = d / "out.jsonl"
    result = invoke(
        "process", str(inp), "-m", tiny_model, "--max-tokens", "5", "-o", str(out),
        "--max-errors", "1", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return types.SimpleNamespace(dir=d, input=inp, out=out, records=read_jsonl(out))


def outputs(job) -> dict:
    return {r["id"]: r["output"] for r in job.records if r["error"] is None}


def mlx_tokenizer(model: str):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(Path(model))


def mlx_load(data: Path, tokenizer) -> dict:
    """train/valid/test as mlx_lm.lora loads them (tuner/datasets.py), processed row by row."""
    from mlx_lm.tuner.datasets import load_dataset

    test = (data / "test.jsonl").exists()  # mlx-lm refuses test=True without a test set
    args = types.SimpleNamespace(data=str(data), train=True, test=test, mask_prompt=False)
    loaded = dict(zip(("train", "valid", "test"), load_dataset(args, tokenizer), strict=True))
    for dataset in loaded.values():
        for i in range(len(dataset)):
            tokens, offset = dataset.process(dataset[i])
            assert tokens and all(isinstance(t, int) for t in tokens) and offset == 0
    return loaded


def examples(loaded: dict) -> dict[str, list[dict]]:
    return {name: [dict(ds[i]) for i in range(len(ds))] for name, ds in loaded.items()}


def canon(rows: list[dict]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def test_chat_set_loads_in_mlx_lm_with_every_successful_row(job, tiny_model):
    data = job.dir / "chat"
    result = invoke("export", str(job.out), "--format", "chat", "--split", "0.6,0.2,0.2",
                    "-o", str(data))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("wrote ")
    assert result.stdout.rstrip().endswith("left out: 1 duplicate, 1 failed")
    loaded = mlx_load(data, mlx_tokenizer(tiny_model))
    from mlx_lm.tuner.datasets import ChatDataset

    assert all(isinstance(ds, ChatDataset) for ds in loaded.values() if len(ds))
    got = examples(loaded)
    out = outputs(job)
    expected = []
    for row in rows():
        if row["id"] in out and row["id"] != "dupB":
            prompt = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
            expected.append(
                {"messages": [*prompt, {"role": "assistant", "content": out[row["id"]]}]}
            )
    assert canon([e for split in got.values() for e in split]) == canon(expected)
    written = [int(w) for w in result.stdout.split("wrote ")[1].split(" examples")[0].split()[::2]]
    assert written == [len(got["train"]), len(got["valid"]), len(got["test"])]
    assert len(got["train"]) > len(got["test"])
    assert not [p for p in data.iterdir() if ".tmp-" in p.name]

    # Deterministic: the same files again, byte for byte.
    again = job.dir / "chat-again"
    invoke("export", str(job.out), "--format", "chat", "--split", "0.6,0.2,0.2", "-o", str(again))
    for name in ("train", "valid", "test"):
        assert (again / f"{name}.jsonl").read_bytes() == (data / f"{name}.jsonl").read_bytes()

    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["kind"] == "export" and manifest["exported"]["format"] == "chat"
    assert (
        manifest["exported"]["sha256"]["train"]
        == hashlib.sha256((data / "train.jsonl").read_bytes()).hexdigest()
    )
    assert manifest["model"]["path"] == os.path.abspath(tiny_model)


def test_split_follows_the_row_id_not_its_position(job, tmp_path, tiny_model):
    """The same ids in another order (another store) land in the same splits."""
    shuffled = rows()[::-1]
    inp = write_jsonl(tmp_path / "in.jsonl", shuffled)
    out = tmp_path / "out.jsonl"
    assert invoke("process", str(inp), "-m", tiny_model, "--max-tokens", "5", "-o", str(out),
                  "--max-errors", "1", "-q").exit_code == 0  # fmt: skip

    def split_by_prompt(data: Path) -> dict[str, str]:
        found = {}
        for name in ("train", "valid", "test"):
            path = data / f"{name}.jsonl"
            for record in read_jsonl(path) if path.exists() else []:
                found[record["prompt"]] = name
        return found

    for source, data in ((job.out, tmp_path / "a"), (out, tmp_path / "b")):
        assert invoke("export", str(source), "--format", "completions", "--split",
                      "0.5,0.25,0.25", "-o", str(data)).exit_code == 0  # fmt: skip
    a, b = split_by_prompt(tmp_path / "a"), split_by_prompt(tmp_path / "b")
    assert a == b and len(set(a.values())) == 3


def test_completions_set_joins_the_system_prompt_and_leaves_out_conversations(job, tiny_model):
    data = job.dir / "completions"
    result = invoke("export", str(job.out), "--format", "completions", "-o", str(data))
    assert result.exit_code == 0, result.output
    assert "left out: 1 duplicate, 1 failed, 1 multi-turn" in result.stdout
    loaded = mlx_load(data, mlx_tokenizer(tiny_model))
    from mlx_lm.tuner.datasets import CompletionsDataset

    assert isinstance(loaded["train"], CompletionsDataset)
    got = [e for split in examples(loaded).values() for e in split]
    out = outputs(job)
    assert {"prompt": "Be brief.\n\nhello there", "completion": out["chat"]} in got
    assert {"prompt": "question 3: " + " ".join(WORDS[:4]), "completion": out["q3"]} in got
    assert len(got) == len(out) - 2  # dupB and the multi-turn chat


def test_text_set_is_the_prompt_as_the_model_saw_it_plus_the_output(job, tiny_model):
    data = job.dir / "text"
    assert invoke("export", str(job.out), "--format", "text", "-o", str(data)).exit_code == 0
    tokenizer = mlx_tokenizer(tiny_model)
    loaded = mlx_load(data, tokenizer)
    from mlx_lm.tuner.datasets import TextDataset

    assert isinstance(loaded["train"], TextDataset)
    got = {e["text"] for split in examples(loaded).values() for e in split}
    out = outputs(job)
    chat_prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat_prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert chat_prompt + out["chat"] in got
    assert "same words" + out["dupA"] in got
    assert len(got) == len(out) - 1


def test_max_length_counts_tokens_as_mlx_lm_does(job, tiny_model):
    tokenizer = mlx_tokenizer(tiny_model)
    full = job.dir / "all"
    assert invoke("export", str(job.out), "--format", "chat", "-o", str(full)).exit_code == 0
    lengths = sorted(
        len(ds.process(ds[i])[0])
        for ds in mlx_load(full, tokenizer).values()
        for i in range(len(ds))
    )
    limit = lengths[len(lengths) // 2]
    longer = sum(n > limit for n in lengths)
    assert 0 < longer < len(lengths)
    short = job.dir / "short"
    result = invoke("export", str(job.out), "--format", "chat", "--max-length", str(limit),
                    "-o", str(short))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{longer} longer than {limit} tokens" in result.stdout
    kept = [len(ds.process(ds[i])[0]) for ds in mlx_load(short, tokenizer).values()
            for i in range(len(ds))]  # fmt: skip
    assert len(kept) == len(lengths) - longer and max(kept) <= limit


def test_drop_truncated_keeps_only_rows_that_finished(job):
    data = job.dir / "finished"
    finished = [r for r in job.records if r["error"] is None and r["finish_reason"] == "stop"]
    truncated = sum(r["finish_reason"] == "length" for r in job.records)
    assert finished and truncated
    result = invoke("export", str(job.out), "--format", "chat", "--drop-truncated", "--split",
                    "1,0,0", "-o", str(data))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{truncated} truncated" in result.stdout
    assert [r["messages"][-1]["content"] for r in read_jsonl(data / "train.jsonl")] == [
        r["output"] for r in finished
    ]
    assert not (data / "valid.jsonl").exists() and not (data / "test.jsonl").exists()


def test_an_empty_split_removes_the_file_of_an_earlier_export(job):
    data = job.dir / "resplit"
    assert invoke("export", str(job.out), "--format", "text", "-o", str(data)).exit_code == 0
    assert (data / "test.jsonl").exists()
    result = invoke("export", str(job.out), "--format", "text", "--split", "0.8,0.2", "-o",
                    str(data))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in data.iterdir()) == ["manifest.json", "train.jsonl", "valid.jsonl"]


def test_template_rows_rebuild_their_prompt_from_the_run_settings(tmp_path, tiny_model):
    inp = write_jsonl(
        tmp_path / "reviews.jsonl", [{"id": i, "text": f"review {i}"} for i in range(4)]
    )
    out = tmp_path / "labels.jsonl"
    assert invoke("process", str(inp), "-m", tiny_model, "--template", "Review: {{ text }}",
                  "--system", "Label it.", "--max-tokens", "3", "-o", str(out),
                  "-q").exit_code == 0  # fmt: skip
    data = tmp_path / "data"
    assert invoke("export", str(out), "--format", "chat", "--split", "1,0,0", "-o",
                  str(data)).exit_code == 0  # fmt: skip
    got = read_jsonl(data / "train.jsonl")
    labels = {r["id"]: r["output"] for r in read_jsonl(out)}
    assert got == [
        {
            "messages": [
                {"role": "system", "content": "Label it."},
                {"role": "user", "content": f"Review: review {i}"},
                {"role": "assistant", "content": labels[i]},
            ]
        }
        for i in range(4)
    ]
    write_jsonl(inp, [{"id": 9, "text": "another file"}])
    changed = invoke("export", str(out), "--format", "chat", "-o", str(tmp_path / "d2"))
    assert changed.exit_code == 1
    assert "the input no longer matches the store's last run" in changed.stderr


def test_dataset_options_need_format_and_a_valid_split(job):
    result = invoke("export", str(job.out), "--split", "0.5,0.5")
    assert result.exit_code == 2 and "need --format" in result.stderr
    result = invoke("export", str(job.out), "--format", "chat", "--split", "0.5,0.2,0.2")
    assert result.exit_code == 2 and "sum to 1" in result.stderr


def test_plain_export_still_rebuilds_the_output_and_writes_a_manifest(job, tmp_path):
    copy = tmp_path / "copy.jsonl"
    result = invoke("export", str(job.out), "--to", str(copy))
    assert result.exit_code == 0 and copy.read_bytes() == job.out.read_bytes()
    manifest = json.loads(Path(f"{copy}.manifest.json").read_text())
    assert manifest["kind"] == "export" and manifest["exported"]["lines"] == len(job.records)
