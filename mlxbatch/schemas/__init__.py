"""JSON schemas shipped with mlxbatch (job file, input records, output records)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def load_schema(name: str) -> dict:
    """The schema `name` (e.g. 'record'), parsed from the package data."""
    text = resources.files(__package__).joinpath(f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)
