"""A decode step's rows taken whole: the same results as taking every row one at a time, for
rows that end on EOS, on a stop string or at max_tokens, report logprobs, or just go on."""

from __future__ import annotations

import pytest

from mlxbatch.pipeline.engine import Engine
from mlxbatch.pipeline.engine.batch import BatchRun
from mlxbatch.records import GenParams, PrefixGroup, Task


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model)


def _tasks(params: list[GenParams]) -> list[Task]:
    prompts = [[5, 9, 14, 30], [3, 22, 40, 41, 7], [8, 11, 60], [2, 70, 71, 72, 9, 4]]
    return [
        Task(
            key=f"k{i}",
            seq=i,
            line=i,
            id=i,
            sample_index=0,
            prompt_ids=prompts[i % len(prompts)],
            params=p,
        )  # fmt: skip
        for i, p in enumerate(params)
    ]


def _run(engine, tasks, one_by_one: bool, monkeypatch) -> dict:
    results = []
    with monkeypatch.context() as patch:
        if one_by_one:
            real = BatchRun._take

            def every_row_alone(self, step):
                # Every row through _advance, as when each row of a step was taken by itself.
                self.stops.update({uid: _Never() for uid in step.uids if uid not in self.stops})
                try:
                    real(self, step)
                finally:
                    for uid in [u for u, w in self.stops.items() if isinstance(w, _Never)]:
                        del self.stops[uid]

            patch.setattr(BatchRun, "_take", every_row_alone)
        engine.generate(
            [PrefixGroup([], tasks)], completion_batch_size=8, prefill_batch_size=8,
            on_result=results.append,
        )  # fmt: skip
    return {r.key: (r.text, r.finish_reason, r.completion_tokens, r.extra) for r in results}


class _Never:
    def hit(self, token: int) -> bool:
        return False

    def cut(self, text: str) -> None:
        return None


def test_a_step_taken_whole_gives_what_each_row_taken_alone_gives(engine, monkeypatch):
    greedy = _run(engine, _tasks([GenParams(max_tokens=6)]), False, monkeypatch)
    text = greedy["k0"][0]
    # An EOS the model emits early in row 0, and a stop string from its text: rows end on both.
    first_tokens = engine.tokenizer.encode(text, add_special_tokens=False)
    monkeypatch.setattr(engine, "eos_ids", [first_tokens[2]])
    params = [
        GenParams(max_tokens=6),
        GenParams(max_tokens=9, stop=(text[3:6],)),
        GenParams(max_tokens=5, logprobs=True, top_logprobs=2),
        GenParams(max_tokens=7),
        GenParams(max_tokens=3),
        GenParams(max_tokens=8, temperature=0.9, seed=3),
    ]
    whole = _run(engine, _tasks(params), False, monkeypatch)
    alone = _run(engine, _tasks(params), True, monkeypatch)
    assert whole == alone
    assert len(whole) == len(params)
    reasons = {reason for _, reason, _, _ in whole.values()}
    assert reasons == {"stop", "length"}
    assert whole["k0"][1] == "stop" and whole["k0"][2] < 6  # ended on the EOS, not in the text
    assert len(whole["k2"][3]["logprobs"]["content"]) == whole["k2"][2]
