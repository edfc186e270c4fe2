"""The tokenizer load: mlx-lm's wrapper as mlx-lm makes it, with one reading of the vocabulary
and the streaming detokenizer built only when first used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlx_lm import tokenizer_utils
from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

from mlxbatch.pipeline.engine.tokenizer import load_tokenizer, top_level_until


def _streamed(tokenizer, ids: list[int]) -> str:
    detokenizer = tokenizer.detokenizer
    for i in ids:
        detokenizer.add_token(i)
    detokenizer.finalize()
    return detokenizer.text


def test_the_wrapper_is_the_one_mlx_lm_makes(tiny_model):
    ours = load_tokenizer(Path(tiny_model), {}, eos_token_ids=[3])
    theirs = mlx_load_tokenizer(Path(tiny_model), {}, eos_token_ids=[3])
    for name in ("eos_token_ids", "has_thinking", "has_chat_template", "structural_markers"):
        assert getattr(ours, name) == getattr(theirs, name), name
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == (
        theirs.apply_chat_template(messages, add_generation_prompt=True)
    )
    ids = theirs.encode("the old robot counts green apples, near the station!")
    assert ours.encode("the old robot counts green apples") == theirs.encode(
        "the old robot counts green apples"
    )
    assert type(ours.detokenizer) is type(theirs.detokenizer)
    assert _streamed(ours, ids) == _streamed(theirs, ids) == theirs.decode(ids)
    # Each use gets a fresh detokenizer of its own, as mlx-lm's property gives.
    assert _streamed(ours, ids[:3]) == theirs.decode(ids[:3])


def test_the_vocabulary_is_read_once_and_the_detokenizer_built_on_first_use(
    tiny_model, monkeypatch
):
    reads, builds = [], []
    bpe = tokenizer_utils.BPEStreamingDetokenizer
    build = bpe.__init__

    def counting_build(self, tokenizer):
        builds.append(1)
        build(self, tokenizer)

    monkeypatch.setattr(bpe, "__init__", counting_build)
    auto = tokenizer_utils.AutoTokenizer
    load = auto.from_pretrained

    def counting_load(*args, **kwargs):
        tokenizer = load(*args, **kwargs)
        vocabulary = tokenizer.get_vocab

        def counting_vocabulary():
            reads.append(1)
            return vocabulary()

        tokenizer.get_vocab = counting_vocabulary
        return tokenizer

    monkeypatch.setattr(auto, "from_pretrained", counting_load)
    mlx_load_tokenizer(Path(tiny_model), {})
    assert len(reads) == 3 and len(builds) == 1  # what mlx-lm's own load does
    reads.clear()
    builds.clear()

    tokenizer = load_tokenizer(Path(tiny_model), {}, eos_token_ids=None)
    assert len(reads) == 1 and builds == []
    first, second = tokenizer.detokenizer, tokenizer.detokenizer
    assert builds == [1] and first is not second
    # mlx-lm's module is as it was, and the tokenizer reads its vocabulary afresh again.
    assert tokenizer_utils.AutoTokenizer is auto
    assert tokenizer_utils.BPEStreamingDetokenizer is bpe
    tokenizer.get_vocab()
    assert len(reads) == 2


def test_the_tokenizer_file_is_parsed_only_up_to_its_decoder(tiny_model):
    text = (Path(tiny_model) / "tokenizer.json").read_text(encoding="utf-8")
    whole = json.loads(text)
    keys = list(whole)
    assert keys.index("decoder") < keys.index("model")  # as `tokenizers` writes the file
    entries = top_level_until(text, "decoder")
    assert list(entries) == keys[: keys.index("decoder") + 1]
    assert all(entries[k] == whole[k] for k in entries)


def test_top_level_until_reads_what_json_reads():
    assert top_level_until(
        ' { "a" : [1, {"decoder": 2}] ,\n "decoder": null, "x": 1}', "decoder"
    ) == {
        "a": [1, {"decoder": 2}],
        "decoder": None,
    }
    for text in ('{"a": 1, "b": {"decoder": 0}}', "{}", "[1, 2]", '"text"'):
        assert top_level_until(text, "decoder") == json.loads(text)
    for broken in ('{"a": 1,', '{"a" 1, "decoder": 2}', '{"a": tru, "decoder": 2}'):
        with pytest.raises(json.JSONDecodeError):
            top_level_until(broken, "decoder")
