"""Task keys: hashing a window's shared head once gives exactly the keys of whole prompts."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mlxbatch.pipeline.keys import KeyHasher, task_key
from mlxbatch.records import GenParams

ids = st.lists(st.integers(min_value=0, max_value=200_000), max_size=12)
params = st.builds(
    GenParams,
    max_tokens=st.integers(1, 9),
    temperature=st.sampled_from([0.0, 0.7]),
    seed=st.integers(0, 3),
    stop=st.sampled_from([(), ("\n", "END")]),
    constraint=st.sampled_from([None, {"type": "regex", "pattern": "a+"}]),
    top_k=st.sampled_from([0, 5]),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    logit_bias=st.sampled_from([(), ((3, -1.5),)]),
)


@settings(max_examples=200, deadline=None)
@given(head=ids, tails=st.lists(ids, min_size=1, max_size=5), other=ids, p=params,
       sample=st.integers(0, 3))  # fmt: skip
def test_a_shared_head_hashed_once_gives_the_keys_of_whole_prompts(head, tails, other, p, sample):
    prompts = [head + t for t in tails]
    keys = KeyHasher("model-x", prompts)
    assert keys.head == head or len(keys.head) > len(head)  # tails may share more
    for prompt in [*prompts, other]:  # `other` need not start with the head at all
        assert keys.key(prompt, p, sample) == task_key("model-x", prompt, p, sample)


def test_task_key_bytes_are_unchanged():
    # Stores hold results under these keys: the hashed JSON must stay byte for byte the same.
    payload = ["m", [1, 2, 3], 8, 0.0, 1.0, [], None, None, None]
    expected = hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()
    assert task_key("m", [1, 2, 3], GenParams(max_tokens=8), 0) == expected
    assert KeyHasher("m", [[1, 2, 3], [1, 2, 4]]).key([1, 2, 3], GenParams(max_tokens=8), 0) == (
        expected
    )
