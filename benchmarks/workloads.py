"""The benchmark workloads: deterministic prompt files under `.bench/data/` and how to run them.

What it does: writes each workload's JSONL input (seeded `random.Random`, words from a fixed
list, so the same arguments always give byte-identical files) and describes the generation
settings every contender must use (max_tokens, n, temperature, template, system prompt).

- `mixed`: `{"id", "prompt"}` rows of 20-320 words, greedy, 128 new tokens.
- `labelling`: `{"id", "text"}` rows of 20-60 words rendered with a row template, after one
  shared ~1,500-token instruction + few-shot system prompt; greedy, 8 new tokens.
- `synthetic`: 64 `{"id", "prompt"}` rows of 20-120 words, n=8 samples at temperature 0.8,
  256 new tokens.

What it does not do: tokenize (token ids come from mlxbatch's own render path, see
contenders.py) or run anything.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOADS = ("mixed", "labelling", "synthetic")

_WORD_TEXT = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book
eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back
parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education foot boy age policy music
market sense nation plan college interest death experience effect class control care field
development role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action model season
society tax director position player record paper space ground form event official matter
center couple site project activity star table need court oil situation cost industry figure
street image phone data picture practice piece land product doctor wall patient worker news
test movie north love support technology step baby computer type attention film tree source
quiet bright slow heavy simple early certain recent strong green happy broken careful open
build carry explain find watch count forget share measure remember paint read bring hold
"""
WORDS = _WORD_TEXT.split()

LABELS = ("positive", "negative", "neutral")
LABEL_TEMPLATE = "Review: {{ text }}\nLabel:"
LABEL_INSTRUCTION = (
    "You are a careful annotator. Read each customer review and answer with exactly one "
    "label: positive, negative or neutral. Judge the writer's overall feeling about the "
    "product or service, not single words. Mixed feelings with no clear lean are neutral. "
    "Answer with the label only, in lower case, with no punctuation.\n\nExamples:\n\n"
)


@dataclass
class Workload:
    """One workload's input file and generation settings, shared by every contender."""

    name: str
    path: Path
    rows: int
    max_tokens: int
    n: int = 1
    temperature: float = 0.0
    template: str | None = None
    system: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def spec_kwargs(self) -> dict[str, Any]:
        """The JobSpec fields (besides input/output/model) that define this workload."""
        return dict(max_tokens=self.max_tokens, n=self.n, temperature=self.temperature,
                    template=self.template, system=self.system, seed=0)  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "input": str(self.path), "rows": self.rows,
                "max_tokens": self.max_tokens, "n": self.n, "temperature": self.temperature,
                "template": self.template, "system_chars": len(self.system or ""),
                **self.notes}  # fmt: skip


def _words(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    # Sentence-ish: a capital and a full stop every 8-16 words.
    out, i = [], 0
    while i < len(words):
        k = rng.randint(8, 16)
        chunk = words[i : i + k]
        out.append(" ".join([chunk[0].capitalize(), *chunk[1:]]) + ".")
        i += k
    return " ".join(out)


def tokenizer_corpus(lines: int = 2000) -> list[str]:
    """Text of the workloads' kind for the benchmark model's tokenizer to learn, so that each
    word is about one token, as in a real tokenizer: GPT-2's BPE makes 512 labelling rows
    1.10 tokens a word, a tokenizer that never saw these words 3.43."""
    rng = random.Random("tokenizer")
    return [LABEL_INSTRUCTION] + [
        f"Review: {_words(rng, 20, 60)}\nLabel: {rng.choice(LABELS)}" for _ in range(lines)
    ]


def _write_rows(path: Path, rows: list[dict]) -> None:
    """Write atomically, and only if the content differs, so files stay byte-identical."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _prompt_rows(prefix: str, rows: int, lo: int, hi: int, seed: int) -> list[dict]:
    rng = random.Random(f"{prefix}:{seed}")
    return [{"id": f"{prefix}{i:05d}", "prompt": _words(rng, lo, hi)} for i in range(rows)]


def labelling_system(count_tokens: Any, target_tokens: int = 1500, seed: int = 0) -> str:
    """Instruction + few-shot examples, grown until `count_tokens(text) >= target_tokens`."""
    rng = random.Random(f"fewshot:{seed}")
    text = LABEL_INSTRUCTION
    while count_tokens(text) < target_tokens:
        text += f"Review: {_words(rng, 20, 60)}\nLabel: {rng.choice(LABELS)}\n\n"
    return text + "Now label the next review."


def make_workload(
    name: str, data_dir: Path, *, rows: int | None, max_tokens: int | None, seed: int = 0,
    count_tokens: Any = None, template: str | None = None, default_rows: int = 64,
    system_tokens: int = 1500,
) -> Workload:  # fmt: skip
    """Write (or reuse) the input file for `name` and return its settings.

    `count_tokens` (text -> int) sizes the labelling system prompt to `system_tokens` tokens of
    the model's own tokenizer; without it, a word-count estimate is used.
    """
    if name == "mixed":
        n_rows = rows or default_rows
        path = data_dir / f"mixed-{n_rows}-s{seed}.jsonl"
        _write_rows(path, _prompt_rows("m", n_rows, 20, 320, seed))
        return Workload(name, path, n_rows, max_tokens or 128,
                        notes={"prompt_words": "20-320"})  # fmt: skip
    if name == "labelling":
        n_rows = rows or default_rows
        rng = random.Random(f"labelling:{seed}")
        data = [{"id": f"l{i:05d}", "text": _words(rng, 20, 60)} for i in range(n_rows)]
        path = data_dir / f"labelling-{n_rows}-s{seed}.jsonl"
        _write_rows(path, data)
        counter = count_tokens or (lambda t: int(len(t.split()) * 1.3))
        system = labelling_system(counter, system_tokens, seed=seed)
        system_file = data_dir / f"labelling-system-{system_tokens}-s{seed}.txt"
        system_file.write_text(system, encoding="utf-8")
        return Workload(name, path, n_rows, max_tokens or 8, template=template or LABEL_TEMPLATE,
                        system=system, notes={"row_words": "20-60",
                                              "system_tokens": counter(system)})  # fmt: skip
    if name == "synthetic":
        n_rows = rows or 64
        path = data_dir / f"synthetic-{n_rows}-s{seed}.jsonl"
        _write_rows(path, _prompt_rows("s", n_rows, 20, 120, seed))
        return Workload(name, path, n_rows, max_tokens or 256, n=8, temperature=0.8,
                        notes={"prompt_words": "20-120"})  # fmt: skip
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def write_subset(workload: Workload, rows: int, directory: Path) -> Path:
    """The first `rows` lines of the workload's file, for warm-up runs."""
    lines = workload.path.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
    path = directory / f"warmup-{workload.path.name}"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def add_workload_options(parser: Any) -> None:
    """The options of a tool that runs one workload on a benchmark model."""
    from benchmarks.models import BENCH_DIR

    parser.add_argument("--model-shape", help="default: tiny on CPU, qwen05b on GPU")
    parser.add_argument("--model", help="a model directory instead of a benchmark shape")
    parser.add_argument("--rows", type=int, help="default: 512 on GPU, 64 on CPU")
    parser.add_argument("--system-tokens", type=int, default=1500, help="labelling's system prompt")
    parser.add_argument("--max-tokens", type=int, help="new tokens a row (default: the workload's)")
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR / "data")


def workload_for(args: Any, name: str = "labelling") -> tuple[str, Workload]:
    """The model directory and the workload `name` that `add_workload_options` ask for."""
    import mlx.core as mx

    from benchmarks.models import bench_model
    from benchmarks.run import _token_counter  # run.py imports this module

    gpu = mx.default_device() == mx.gpu
    model = bench_model(args.model, args.model_shape, gpu)
    workload = make_workload(
        name,
        args.data_dir,
        rows=args.rows,
        max_tokens=args.max_tokens,
        count_tokens=_token_counter(model),
        system_tokens=args.system_tokens,
        default_rows=512 if gpu else 64,
    )
    return model, workload
