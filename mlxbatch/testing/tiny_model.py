"""Build a small random-weight Llama model directory that ``mlx_lm.load`` accepts.

What it does: writes ``config.json``, ``model.safetensors`` (random weights, deterministic
from ``seed``), a byte-level BPE ``tokenizer.json`` trained on a fixed built-in corpus of
English sentences (plus invented names when ``vocab_size`` needs more merges, and any
``corpus`` lines the caller adds, e.g. the text a benchmark will feed it),
``tokenizer_config.json`` with a ChatML chat template, ``special_tokens_map.json`` and
``generation_config.json``. The result goes through mlx_lm's real loading path, so tests
and benchmarks exercise the same code as a downloaded checkpoint. Generated text depends on
the whole context, so batching or cache bugs change it.

What it does not do: produce meaningful text (weights are noise, so expect stray bytes and
rarely an early EOS), mimic a published tokenizer, quantize, shard weights, or build any
architecture but Llama. The tokenizer depends only on ``vocab_size`` and ``corpus``; ``seed``
changes only the weights.

CLI: ``python -m mlxbatch.testing.tiny_model OUT_DIR [--hidden-size N ...]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import random
from collections.abc import Sequence

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_TOKEN, IM_START, EOS_TOKEN = SPECIAL_TOKENS
DTYPES = ("float32", "bfloat16", "float16")
EMBED_STD = 0.02

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Corpus word pools: one paragraph per pool, items separated by "|".
_POOLS = """
The cat|A young engineer|My neighbour|The old library|Every student|Our team|The river|
She|He|They|The small robot|A tired traveller

quietly reads|builds|remembers|carries|paints|explains|finds|watches|counts|forgets|
shares|measures

a long letter|the blue bicycle|three green apples|an old map|the weather report|
a simple answer|forty-two stones|the morning news|a cup of coffee|the broken clock|
his favourite song|the final chapter

in the garden.|before breakfast.|after the rain stopped.|near the station.|every Tuesday.|
with great care!|without saying a word.|at 7:30 p.m.|because it's important.|
while the kettle boils.|on the 3rd floor.|during the café's busy hour.

What time is it?|Could you help me, please?|Why is the sky blue?|
How many tokens are in this sentence?|Where did you put the keys?|Is 2 + 2 equal to 4?|
Which path leads home?|Don't you think so?
"""
_SUBJECTS, _VERBS, _OBJECTS, _TAILS, _QUESTIONS = (
    para.replace("\n", "").split("|") for para in _POOLS.strip().split("\n\n")
)


def _corpus(n_names: int, n_sentences: int = 600) -> list[str]:
    # Fixed RNG so the trained tokenizer is identical on every build.
    rng = random.Random(1234)
    lines = []
    for i in range(n_sentences):
        words = [rng.choice(pool) for pool in (_SUBJECTS, _VERBS, _OBJECTS, _TAILS)]
        line = " ".join(words)
        if i % 5 == 0:
            line += " " + rng.choice(_QUESTIONS)
        if i % 7 == 0:
            line = f"{i}. {line} ({rng.randint(0, 9999)})"
        lines.append(line)
    # The sentences alone give BPE only ~880 tokens; invented names supply merges for
    # bigger vocabularies, so those are real text rather than padding.
    for _ in range(n_names):
        name = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        lines.append(f"{name.title()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.")
    return lines


def _build_tokenizer(vocab_size: int, corpus: Sequence[str] = ()):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    lines = [*corpus, *_corpus(n_names=max(0, vocab_size - 512))]
    tok.train_from_iterator(lines, trainer=trainer)
    # If merges still run out, pad so every embedding row is a real token id: a random
    # model samples all of them, and detokenizers index by id.
    n_pad = vocab_size - tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(n_pad)])
    assert tok.get_vocab_size() == vocab_size
    return tok


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_weights(path: pathlib.Path, config: dict, dtype: str, seed: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    # Use the same class mlx_lm.load instantiates, so parameter names match exactly. Its
    # own init stays lazy and is never evaluated; we only read names and shapes.
    model = llama.Model(llama.ModelArgs.from_dict(config))
    shapes = {name: p.shape for name, p in dict(tree_flatten(model.parameters())).items()}
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights = {}
    for (name, shape), key in zip(shapes.items(), keys, strict=True):
        if name.endswith("norm.weight"):
            w = mx.ones(shape)
        else:
            # Fan-in scaling, not a flat 0.02: with tiny projections the residual stream is
            # just the last token's embedding and the tied head echoes it back, so output
            # would ignore context and hide batching, masking and cache bugs.
            std = EMBED_STD if name == "model.embed_tokens.weight" else shape[1] ** -0.5
            bound = std * 3**0.5  # uniform, not normal: several times faster on CPU
            w = mx.random.uniform(-bound, bound, shape, key=key)
        weights[name] = w.astype(getattr(mx, dtype))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})


def build_tiny_model(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    seed: int = 0,
    corpus: Sequence[str] = (),
) -> pathlib.Path:
    """Write a random-weight Llama model with a ChatML BPE tokenizer into ``path``; the
    tokenizer also learns ``corpus``, so its words become single tokens as in a real one."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError("hidden_size must divide by heads, and heads by kv heads")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError("vocab_size must cover the 256 byte tokens plus special tokens")

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer(vocab_size, corpus)
    tok.save(str(path / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS_TOKEN)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "bos_token_id": None,  # like ChatML models: the tokenizer adds no BOS
        "eos_token_id": eos_id,
    }
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {"bos_token_id": None, "eos_token_id": eos_id})
    special = {
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, EOS_TOKEN],
    }
    _write_json(path / "special_tokens_map.json", special)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        **special,
        "model_max_length": max_position_embeddings,
        # Older transformers default to cleanup, which turns " ." into "." on decode.
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    _write_weights(path, config, dtype, seed)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight model directory.")
    parser.add_argument("out_dir")
    # Flags mirror the keyword arguments so the two cannot drift apart.
    for p in inspect.signature(build_tiny_model).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            flag = "--" + p.name.replace("_", "-")
            choices = DTYPES if p.name == "dtype" else None
            parser.add_argument(flag, type=type(p.default), default=p.default, choices=choices)
    args = vars(parser.parse_args(argv))
    print(build_tiny_model(args.pop("out_dir"), **args))


if __name__ == "__main__":
    main()
