"""Prompt texts to token ids, with the beginning that all texts of a window share encoded once.

A labelling job puts one long instruction in front of every row: encoding it once per window,
not once per row, cut encoding time ~7x (512 rows behind a 1,500-token system prompt). The
texts are split only where the split cannot change the ids: just after a special token that
Hugging Face tokenizers split out before anything else (the pieces between such tokens are
encoded independently), and the result is checked against a whole encoding of the first text.
It does not render prompts (render.py) and knows nothing of the model.
"""

from __future__ import annotations

import os
from typing import Any

# Shorter shared beginnings are encoded with each text: splitting would save nothing.
MIN_SHARED_CHARS = 256


def encode_texts(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of many texts, in one call to the Rust tokenizer when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]
    # With special tokens added, the tokenizer may add them around every piece: no split.
    cut = 0 if add_special_tokens or len(texts) < 2 else shared_head(backend, texts)
    if cut:
        head = backend.encode(texts[0][:cut], add_special_tokens=False).ids
        tails = backend.encode_batch([t[cut:] for t in texts], add_special_tokens=False)
        ids = [head + e.ids for e in tails]
        # A pre-tokenizer that treats the first piece of a text apart (e.g. Metaspace's
        # prepend_scheme="first") shows here, the same way for every text.
        if ids[0] == backend.encode(texts[0], add_special_tokens=False).ids:
            return ids
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


def shared_head(backend: Any, texts: list[str]) -> int:
    """Length of the texts' shared beginning up to the end of the last special token in it
    that splits the text for every tokenization; 0 when there is none worth splitting at."""
    common = os.path.commonprefix(texts)
    if len(common) < MIN_SHARED_CHARS:
        return 0
    ends = [common.rfind(t) + len(t) for t in splitting_tokens(backend, within=common)]
    cut = max(ends, default=0)
    return cut if cut >= MIN_SHARED_CHARS else 0


def splitting_tokens(backend: Any, within: str | None = None) -> list[str]:
    """Added tokens (those occurring in `within`, when given) that split any text they occur
    in, whatever follows them.

    They are matched in the raw text (not normalized), keep the whitespace next to them and
    need no word boundary; and no other such token contains one, since the longest match
    would then decide by what follows.
    """
    added = list(backend.get_added_tokens_decoder().values())
    raw = [t.content for t in added if not t.normalized]
    # Only the few tokens found in the text are checked against all others: tokenizers with
    # thousands of reserved tokens would otherwise cost a quadratic scan per window.
    found = [t for t in added if within is None or t.content in within]
    return [
        t.content
        for t in found
        if not (t.normalized or t.rstrip or t.lstrip or t.single_word)
        and not any(t.content in other and t.content != other for other in raw)
    ]
