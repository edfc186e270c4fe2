"""Content keys of tasks: a hash of what makes a sample's output (model, prompt ids, settings).

The store maps key -> result, so these bytes must never change for the same inputs. Many
prompts of a window start alike (a system prompt, few-shot examples): `KeyHasher` hashes the
JSON of that shared head once and continues a copy of the hash per prompt, which gives the
same digests as `task_key` (the JSON of 512 labelling prompts of 1,700 ids took ~1/3 of their
render time). Nothing here renders or tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from mlxbatch.records import GenParams


def task_key(
    model_identity: str, prompt_ids: list[int], params: GenParams, sample_index: int
) -> str:
    """Content key of one sample: same key, same result, so the store can skip it."""
    payload = [model_identity, prompt_ids, *_settings(params, sample_index)]
    blob = json.dumps(payload, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _settings(params: GenParams, sample_index: int) -> list[Any]:
    """What of a sample's generation settings goes into its key, after the prompt."""
    sampling = params.temperature > 0
    payload: list[Any] = [
        params.max_tokens,
        params.temperature,
        params.top_p if sampling else 1.0,
        list(params.stop),
        # A seed changes nothing under greedy decoding, so it stays out of the key then.
        params.seed if sampling else None,
        sample_index if sampling else None,
        json.dumps(params.constraint, sort_keys=True) if params.constraint else None,
    ]
    # Newer parameters join the key only when set, so keys of plain rows stay as they were.
    extras = {
        "top_k": params.top_k if sampling else 0,
        "min_p": params.min_p if sampling else 0.0,
        "repetition_penalty": params.repetition_penalty,
        "logit_bias": [list(b) for b in params.logit_bias],
        "logprobs": params.top_logprobs if params.logprobs else -1,
    }
    defaults = {
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "logit_bias": [],
        "logprobs": -1,
    }
    return payload + [[k, v] for k, v in extras.items() if v != defaults[k]]


class KeyHasher:
    """`task_key` for many prompts: the JSON of the ids they all start with is hashed once."""

    def __init__(self, model_identity: str, prompts: list[list[int]]):
        self.model_identity = model_identity
        self.head = list(os.path.commonprefix(prompts)) if prompts else []  # of lists too
        text = json.dumps([model_identity, self.head], separators=(",", ":"))
        self.hash = hashlib.sha256(text[:-2].encode())  # '["identity",[h1,...,hk'

    def key(self, prompt_ids: list[int], params: GenParams, sample_index: int) -> str:
        n = len(self.head)
        if not n or prompt_ids[:n] != self.head:
            return task_key(self.model_identity, prompt_ids, params, sample_index)
        tail = ",".join(map(str, prompt_ids[n:]))
        settings = json.dumps(_settings(params, sample_index), separators=(",", ":"))
        h = self.hash.copy()
        h.update(f"{',' if tail else ''}{tail}],{settings[1:]}".encode())
        return h.hexdigest()
