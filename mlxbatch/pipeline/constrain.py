"""Constraints on what a row may generate: JSON schema, any JSON object, a regex, or one of choices.

A constraint is a plain dict (`{"type": "json_schema", "schema": {...}}`, `{"type":
"json_object"}`, `{"type": "regex", "pattern": ...}`, `{"type": "choices", "choices": [...]}`),
normalised from OpenAI's `response_format` or mlxbatch's own fields. JSON and regex constraints
compile to llguidance grammars; `TokenMasks` turns them into a per-row, per-step allowed-token
mask (numpy) that the engine applies to the logits. Choices are not generated token by token:
the engine scores every choice and this module turns the scores into probabilities. This module
does not import mlx.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from functools import cache
from typing import Any

import numpy as np

JSON_KINDS = ("json_schema", "json_object")
# Compact JSON: a weak model would otherwise fill free whitespace until max_tokens.
GRAMMAR_DEFAULTS: Any = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """A constraint that is malformed or that the grammar engine cannot compile."""


def from_row(data: dict[str, Any]) -> dict | None:
    """The constraint a row (or an OpenAI body) asks for, normalised; None if it asks for none."""
    if data.get("choices") is not None:
        return {"type": "choices", "choices": list(data["choices"])}
    if data.get("regex") is not None:
        return {"type": "regex", "pattern": data["regex"]}
    fmt = data.get("response_format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec = fmt.get("json_schema") or {}
    return {"type": "json_schema", "schema": spec.get("schema", {})}


def constraint_hash(constraint: dict | None) -> str | None:
    if constraint is None:
        return None
    blob = json.dumps(constraint, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def grammar(constraint: dict) -> str:
    """The llguidance grammar of a JSON or regex constraint."""
    from llguidance import LLMatcher

    kind = constraint["type"]
    if kind == "regex":
        return LLMatcher.grammar_from_regex(constraint["pattern"])
    schema = {"type": "object"} if kind == "json_object" else constraint.get("schema", {})
    return LLMatcher.grammar_from_json_schema(schema, defaults=GRAMMAR_DEFAULTS)


def check(constraint: dict) -> None:
    """Raise ConstraintError if the constraint cannot be used; runs before any model loads."""
    kind = constraint["type"]
    if kind == "choices":
        choices = constraint["choices"]
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError("choices must be a non-empty list of non-empty strings")
        if len(set(choices)) != len(choices):
            raise ConstraintError("choices must be distinct")
        return
    _checked_grammar(json.dumps(constraint, sort_keys=True))


@cache
def _checked_grammar(constraint_json: str) -> None:
    from llguidance import LLMatcher

    try:
        text = grammar(json.loads(constraint_json))
    except ValueError as e:
        raise ConstraintError(f"cannot compile the constraint: {e}") from None
    error = LLMatcher.validate_grammar(text)
    if error:
        # One line per problem: llguidance's messages draw carets over several lines.
        raise ConstraintError(f"cannot compile the constraint: {' '.join(error.split())}")


class TokenMasks:
    """Builds per-row matchers over one tokenizer; llguidance's tokenizer is built once."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: list[int]):
        import llguidance.hf

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=vocab_size, eos_token=eos_ids
        )

    def matcher(self, constraint: dict) -> RowMatcher:
        return RowMatcher(self, grammar(constraint))


class RowMatcher:
    """One row's grammar state: feed it each sampled token, get the next allowed-token mask."""

    def __init__(self, masks: TokenMasks, grammar_text: str):
        from llguidance import LLMatcher

        self.vocab_size = masks.vocab_size
        self.matcher = LLMatcher(masks.tokenizer, grammar_text, log_level=0)

    def allowed(self, sampled: int | None) -> np.ndarray:
        """Consume the token sampled last step (None at the first step); the allowed tokens next."""
        if sampled is not None:
            self.matcher.consume_token(sampled)
        if self.matcher.is_error():
            raise ConstraintError(self.matcher.get_error())
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)


def parse_output(constraint: dict | None, text: str, finish_reason: str) -> tuple[Any, str | None]:
    """(parsed value, error code) of a finished constrained row; (None, None) if unconstrained."""
    if constraint is None or constraint["type"] not in JSON_KINDS:
        return None, None
    if finish_reason == "length":
        return None, "incomplete_json"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None, "invalid_json"
    if constraint["type"] == "json_schema":
        import jsonschema

        if not jsonschema.Draft202012Validator(constraint.get("schema", {})).is_valid(value):
            return None, "schema_mismatch"
    return value, None


def choice_distribution(choices: list[str], logprobs: list[float]) -> dict[str, float]:
    """Each choice's probability, normalised over the choices."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return {c: w / total for c, w in zip(choices, weights, strict=True)}


def pick_choice(probs: dict[str, float], temperature: float, seed_material: str) -> str:
    """The most probable choice, or at temperature > 0 a draw seeded by the row alone."""
    if temperature <= 0:
        return max(probs, key=lambda c: probs[c])
    weights = [p ** (1.0 / temperature) for p in probs.values()]
    rng = random.Random(hashlib.sha256(seed_material.encode()).digest())
    return rng.choices(list(probs), weights=weights)[0]
