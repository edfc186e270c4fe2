"""Load a model's tokenizer through mlx-lm, without the scans of its vocabulary a run never uses.

mlx-lm's `load_tokenizer` asks the Hugging Face tokenizer for its whole vocabulary three
times (thinking tokens, structural markers, tool parser: a fresh dict each time) and builds a
streaming detokenizer's table of every token's text, which a run needs only for stop strings.
With a 126k-token vocabulary that was 0.31 s of a 0.83 s load (2-core CPU); parsing the
whole `tokenizer.json` again, for its decoder's kind alone, another 0.12 s. Here mlx-lm's own
loader runs with the vocabulary read once, the detokenizer built on first use and the file read
only up to its "decoder" (written before the vocabulary), so what it decides (EOS ids, thinking
tokens, chat template, detokenizer kind) is still mlx-lm's.

It does not load weights (load.py) or render prompts (pipeline/render.py).
"""

from __future__ import annotations

import copy
import functools
import json
import threading
from pathlib import Path
from typing import Any

# The streaming detokenizers mlx-lm's loader picks from by name, each swapped for a deferred one.
DETOKENIZERS = ("NaiveStreamingDetokenizer", "SPMStreamingDetokenizer", "BPEStreamingDetokenizer")
_SWAP_LOCK = threading.Lock()


def load_tokenizer(path: Path, config_extra: dict, eos_token_ids: Any) -> Any:
    """mlx-lm's TokenizerWrapper for the model at `path`, as `mlx_lm.utils.load_tokenizer`
    makes it."""
    from mlx_lm import tokenizer_utils
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    swaps = {
        name: _deferred(getattr(tokenizer_utils, name))
        for name in DETOKENIZERS
        if hasattr(tokenizer_utils, name)
    }
    auto = swaps["AutoTokenizer"] = _VocabularyOnce(tokenizer_utils.AutoTokenizer)
    swaps["json"] = _DecoderOnlyJson()
    # One load at a time swaps the module's names: two would restore each other's.
    with _SWAP_LOCK:
        saved = {name: getattr(tokenizer_utils, name) for name in swaps}
        for name, value in swaps.items():
            setattr(tokenizer_utils, name, value)
        try:
            wrapper = mlx_load_tokenizer(path, config_extra, eos_token_ids=eos_token_ids)
        finally:
            for name, value in saved.items():
                setattr(tokenizer_utils, name, value)
    auto.restore()  # from now on the vocabulary is read afresh, should tokens be added
    return wrapper


class _VocabularyOnce:
    """Stands in for transformers' AutoTokenizer in mlx-lm's loader: the tokenizer it loads
    answers `get_vocab` from one reading until `load_tokenizer` is done."""

    def __init__(self, auto: Any):
        self._auto = auto
        self._loaded: list[tuple[Any, Any]] = []  # each tokenizer, and its own get_vocab if any

    def __getattr__(self, name: str) -> Any:
        return getattr(self._auto, name)

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        tokenizer = self._auto.from_pretrained(*args, **kwargs)
        self._loaded.append((tokenizer, vars(tokenizer).get("get_vocab")))
        tokenizer.get_vocab = functools.cache(tokenizer.get_vocab)
        return tokenizer

    def restore(self) -> None:
        for tokenizer, own in self._loaded:
            if own is None:
                del tokenizer.get_vocab
            else:
                tokenizer.get_vocab = own


def _deferred(detokenizer_class: Any) -> Any:
    return functools.partial(DeferredDetokenizer, detokenizer_class)


class DeferredDetokenizer:
    """A streaming detokenizer built the first time it is used: TokenizerWrapper hands out
    copies of the one it holds (its `detokenizer` property), so the first copy builds it."""

    def __init__(self, detokenizer_class: Any, tokenizer: Any, **kwargs: Any):
        self._make = functools.partial(detokenizer_class, tokenizer, **kwargs)
        self._built: Any = None

    def built(self) -> Any:
        if self._built is None:
            self._built = self._make()
        return self._built

    def __copy__(self) -> Any:
        return copy.copy(self.built())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.built(), name)


class _DecoderOnlyJson:
    """Stands in for the json module in mlx-lm's loader, which parses `tokenizer.json` only to
    look at its "decoder": the file's top-level entries are parsed up to that one, the rest
    (the vocabulary and merges, written after it) left unparsed."""

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)

    def load(self, file: Any, **kwargs: Any) -> Any:
        if kwargs or not str(getattr(file, "name", "")).endswith("tokenizer.json"):
            return json.load(file, **kwargs)
        return top_level_until(file.read(), "decoder")


def top_level_until(text: str, wanted: str) -> dict:
    """The top-level entries of the JSON object `text`, parsed one at a time up to the first
    named `wanted`; the whole object when there is none."""
    decoder = json.JSONDecoder()
    end = _skip(text, 0)
    if text[end : end + 1] != "{":
        return json.loads(text)  # not an object: json's own error or value
    entries: dict = {}
    end = _skip(text, end + 1)
    while text[end : end + 1] == '"':
        key, end = decoder.raw_decode(text, end)
        end = _skip(text, end)
        if text[end : end + 1] != ":":
            return json.loads(text)
        value, end = decoder.raw_decode(text, _skip(text, end + 1))
        entries[key] = value
        if key == wanted:
            return entries
        end = _skip(text, end)
        if text[end : end + 1] == ",":
            end = _skip(text, end + 1)
    return json.loads(text)  # no `wanted` entry: the whole object, as json.load gives it


def _skip(text: str, i: int) -> int:
    """The index of the first character at or after `i` that is not JSON whitespace."""
    while text[i : i + 1] in (" ", "\t", "\n", "\r"):
        i += 1
    return i
