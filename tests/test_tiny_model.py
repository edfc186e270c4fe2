"""The tiny model builder must produce a directory that mlx_lm loads and runs for real."""

import pytest

from mlxbatch.testing.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from mlx_lm import load

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return load(str(path))


def test_loads_and_generates_context_dependent_tokens(loaded):
    from mlx_lm import batch_generate
    from mlx_lm.generate import stream_generate

    model, tok = loaded
    assert len(tok) == 512
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|im_end|>")}
    prompts = ["hello world", "goodbye world", "The cat reads an old map."]
    single = [[r.token for r in stream_generate(model, tok, p, max_tokens=8)] for p in prompts]
    assert all(len(ids) == 8 for ids in single)
    # Same last token, different prefix: a model that ignores context would agree here.
    assert single[0] != single[1]
    batch = batch_generate(
        model, tok, [tok.encode(p) for p in prompts], max_tokens=8, return_token_ids=True
    )
    assert [list(ids) for ids in batch.token_ids] == single


def test_chat_template_renders_generation_prompt(loaded):
    _, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "text", ["hello world", " two  spaces\tand\nlines ", "café ☕", "日本語 🎉 naïve", "a .b ,c"]
)
def test_tokenizer_round_trips_without_adding_specials(loaded, text):
    _, tok = loaded
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.all_special_ids)
