"""encode_texts: a shared beginning encoded once gives exactly the ids of whole encodings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from mlx_lm.utils import load_tokenizer
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

from mlxbatch.pipeline.encode import encode_texts, shared_head, splitting_tokens
from tests.conftest import WORDS

SYSTEM = " ".join(WORDS * 40)


def whole(backend: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [backend.encode(t, add_special_tokens=False).ids for t in texts]


def chat_texts(tokenizer, rows: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in rows
    ]


def test_shared_system_prompt_is_encoded_once_with_identical_ids(tiny_model: str):
    tokenizer = load_tokenizer(Path(tiny_model))
    backend = tokenizer.backend_tokenizer
    rows = [" ".join(WORDS[i % 7 : i % 7 + 3 + i % 5]) for i in range(20)] + ["", "  spaced "]
    texts = chat_texts(tokenizer, rows)
    cut = shared_head(backend, texts)
    # Split right after the special token that opens the user turn, past the system prompt.
    assert texts[0][:cut].endswith("<|im_start|>") and cut > len(SYSTEM)
    assert encode_texts(tokenizer, texts, False) == whole(backend, texts)
    # Too little shared, a single text, or special tokens to add: whole encodings.
    assert shared_head(backend, ["<|im_start|>a", "<|im_start|>b"]) == 0
    assert encode_texts(tokenizer, texts[:1], False) == whole(backend, texts[:1])


def test_a_token_inside_a_longer_added_token_is_no_split_point(tiny_model: str):
    backend = Tokenizer.from_str(load_tokenizer(Path(tiny_model)).backend_tokenizer.to_str())
    backend.add_special_tokens([AddedToken("<|im_start|>user", normalized=False)])
    backend.add_special_tokens([AddedToken("<|sep|>", normalized=False, rstrip=True)])
    tokens = splitting_tokens(backend)
    assert "<|im_end|>" in tokens
    assert "<|im_start|>" not in tokens  # what follows decides the match
    assert "<|sep|>" not in tokens  # it takes the whitespace after it
    tokenizer = SimpleNamespace(backend_tokenizer=backend)
    # The first text is checked whole, so the cases that need these rules come after it.
    for texts in (
        [SYSTEM + "<|im_end|>\n<|im_start|>" + row for row in ("other b", "user a")],
        [SYSTEM + "<|im_end|><|sep|>" + row for row in ("x", "  y")],
    ):
        assert shared_head(backend, texts) > 0
        assert encode_texts(tokenizer, texts, False) == whole(backend, texts)


def test_a_tokenizer_that_marks_the_first_piece_falls_back_to_whole_encodings():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.add_special_tokens([AddedToken("<s>", normalized=False)])
    backend.train_from_iterator([SYSTEM] * 4, trainers.BpeTrainer(vocab_size=300))
    texts = [SYSTEM + "<s>" + row for row in ("cat sat", "robot counts", "old mat")]
    cut = shared_head(backend, texts)
    assert cut == len(SYSTEM) + 3
    split = [
        backend.encode(t[:cut], add_special_tokens=False).ids
        + backend.encode(t[cut:], add_special_tokens=False).ids
        for t in texts
    ]
    assert split != whole(backend, texts)  # the tail alone would get a leading "▁"
    tokenizer = SimpleNamespace(backend_tokenizer=backend)
    assert encode_texts(tokenizer, texts, False) == whole(backend, texts)
