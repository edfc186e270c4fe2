"""A digest of a file's first bytes, read in chunks, with the newlines among them.

Used to tell whether a file still starts as it did: an input that lines were appended to
(resume.py), an output whose final lines an export keeps (output_prefix.py).
"""

from __future__ import annotations

import hashlib
from typing import Any

_CHUNK = 1 << 20


def start_digest(path: str, size: int) -> tuple[Any, int] | None:
    """(a blake2b object fed the first `size` bytes of `path`, how many newlines they hold);
    None if it cannot read them all."""
    digest = hashlib.blake2b(digest_size=20)
    lines = 0
    try:
        with open(path, "rb") as f:
            left = size
            while left and (chunk := f.read(min(_CHUNK, left))):
                digest.update(chunk)
                lines += chunk.count(b"\n")
                left -= len(chunk)
    except OSError:
        return None
    return (digest, lines) if not left else None
