"""SentencePiece ("llama") GGUF vocabularies: our tokenizer against the sentencepiece library on a model
trained in the test, llama.cpp's rules around special tokens, transformers' GGUF tokenizer, and a tiny
SentencePiece-tokenized GGUF model served by the engine."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.loader.gguf_file import open_gguf, read_metadata
from engine.loader.gguf_tokenizer import build_gguf_tokenizer, gguf_tokenizer_info
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, FinishReason, SamplingParams, StructuredSpec
from tests.engine.conftest import build_tiny_hf_model
from tests.engine.tiny_gguf import SpmVocab, train_sentencepiece, write_llama_gguf

# No control or user-defined token text here: SentencePiece itself never splits those out (llama.cpp
# does; test_special_tokens_split_as_llama_cpp covers them).
CASES = [
    "",
    " ",
    "  ",
    "Hello world",
    "Hello, world!",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "multiple   inner    spaces",
    "new\nline",
    "\nstarts with a newline",
    "ends with a newline\n",
    "blank\n\n\nlines",
    "tabs\tand\r\nCRLF",
    "    indented code",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention reads keys and values through a block table.",
    "Numbers: 0 7 42 12345 3.14159 -2.5e10",
    "2024-06-01T12:34:56Z",
    "Punctuation!?.,;:'\"()[]{}<>",
    "a+b=c; x*y/z % 2 == 0 && ~mask | flag",
    "Café naïve résumé",
    "Ünïcödé ünd ßtraße",
    "日本語のテキスト",
    "Ελληνικά и русский",
    "emoji 🚀🔥",
    "👍🏽 skin tone and 🇫🇷 flag",
    "😀",
    "mixed😀emoji😀inside",
    "\u2581already a metaspace",
    "ÿ and \x01 control \x7f chars",
    "x" * 80,
    "TandemTandem tandem TANDEM",
    "<0x41> looks like a byte token",
]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


@pytest.fixture(scope="module")
def vocab() -> SpmVocab:
    return train_sentencepiece(512)  # the tiny models' vocabulary size


@pytest.fixture(scope="module")
def gguf_path(vocab: SpmVocab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("spm-gguf")
    model = build_tiny_hf_model("llama")
    return write_llama_gguf(folder / "tiny-spm.gguf", model, vocab, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def metadata(gguf_path: Path) -> dict[str, Any]:
    return read_metadata(open_gguf(gguf_path))


@pytest.fixture(scope="module")
def ours(metadata: dict[str, Any]) -> Tokenizer:
    # Through the same JSON an API process receives.
    return Tokenizer.from_str(gguf_tokenizer_info(metadata).tokenizer_json)


def test_encode_matches_sentencepiece(vocab: SpmVocab, ours: Tokenizer) -> None:
    sp = vocab.processor
    for text in CASES:
        got = ours.encode(text, add_special_tokens=False).ids
        assert got == sp.encode(text), f"text={text!r} pieces={[ours.id_to_token(i) for i in got]}"


def test_decode_matches_sentencepiece_and_round_trips(vocab: SpmVocab, ours: Tokenizer) -> None:
    sp = vocab.processor
    for text in CASES:
        ids = sp.encode(text)
        # A "▁" in the text is SentencePiece's space, so it comes back as one (from both).
        assert ours.decode(ids) == sp.decode(ids) == text.replace("\u2581", " "), f"text={text!r}"
    # Where they differ: byte tokens that do not form UTF-8 become one U+FFFD each in `tokenizers`'
    # ByteFallback decoder (as for Hugging Face's own Llama tokenizers), SentencePiece keeps the valid ones.
    broken = [vocab.tokens.index("<0xF0>"), vocab.tokens.index("<0x41>")]
    assert (ours.decode(broken), sp.decode(broken)) == ("\ufffd\ufffd", "\ufffdA")


def test_without_space_prefix_matches_sentencepiece() -> None:
    # Gemma-style vocabularies: no space in front (tokenizer.ggml.add_space_prefix = false).
    vocab = train_sentencepiece(400, add_dummy_prefix=False)
    ours = build_gguf_tokenizer(_metadata_of(vocab, {"tokenizer.ggml.add_space_prefix": False}))
    for text in CASES:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == vocab.processor.encode(text), f"text={text!r}"
        expected_text = text.replace("\u2581", " ")
        assert ours.decode(ids) == vocab.processor.decode(ids) == expected_text, f"text={text!r}"


def _metadata_of(vocab: SpmVocab, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": vocab.tokens,
        "tokenizer.ggml.scores": vocab.scores,
        "tokenizer.ggml.token_type": vocab.token_types,
        **(extra or {}),
    }


def test_special_tokens_split_as_llama_cpp(vocab: SpmVocab, ours: Tokenizer) -> None:
    """Control, unknown and user-defined tokens match whole; llama.cpp encodes each stretch of text between
    them as SentencePiece encodes a whole input (so each gets the prefix space)."""
    sp = vocab.processor
    im_start, im_end = vocab.tokens.index("<|im_start|>"), vocab.tokens.index("<|im_end|>")
    assert (vocab.token_types[im_start], vocab.token_types[im_end]) == (4, 3)  # user-defined, control
    cases = {
        "<|im_start|>user\nHi there<|im_end|>\n": [
            im_start,
            *sp.encode("user\nHi there"),
            im_end,
            *sp.encode("\n"),
        ],
        "what <|im_end|> now": [*sp.encode("what "), im_end, *sp.encode(" now")],
        "<s>Hello</s>": [1, *sp.encode("Hello"), 2],
        "<unk>": [0],
        "<|im_end|><|im_end|>": [im_end, im_end],
    }
    for text, expected in cases.items():
        assert ours.encode(text, add_special_tokens=False).ids == expected, f"text={text!r}"
    ids = cases["<|im_start|>user\nHi there<|im_end|>\n"]
    # Control tokens are skipped on decode, user-defined ones are text; the prefix spaces come back.
    assert ours.decode(ids, skip_special_tokens=True) == "<|im_start|> user\nHi there \n"
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|> user\nHi there<|im_end|> \n"


def test_agrees_with_transformers_gguf_tokenizer(gguf_path: Path, ours: Tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in CASES:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), f"text={text!r}"
        # transformers' converter (a Metaspace pre-tokenizer) adds no prefix space to text that already
        # starts with one; SentencePiece and llama.cpp do (test_encode_matches_sentencepiece).
        if not text.startswith((" ", "\u2581")):
            assert ids == hf.encode(text, add_special_tokens=False), f"text={text!r}"
    # add_bos_token: BOS in front with add_special_tokens, as transformers does.
    with_bos = hf.encode("Hello world")
    assert ours.encode("Hello world").ids == with_bos and with_bos[0] == 1


def test_tokenizer_info_and_llama_cpp_defaults(vocab: SpmVocab, metadata: dict[str, Any]) -> None:
    info = gguf_tokenizer_info(metadata)
    assert (info.bos_token, info.eos_token, info.eos_token_ids) == ("<s>", "</s>", [2])
    assert info.add_bos_token and info.special_tokens == {"unk_token": "<unk>"}
    assert info.chat_template == CHAT_TEMPLATE

    # A file that leaves the special ids and flags out gets llama.cpp's SentencePiece defaults.
    bare = gguf_tokenizer_info(_metadata_of(vocab))
    assert (bare.bos_token, bare.eos_token, bare.eos_token_ids, bare.add_bos_token) == (
        "<s>",
        "</s>",
        [2],
        True,
    )

    with_eos = build_gguf_tokenizer(
        _metadata_of(vocab, {"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True})
    )
    assert with_eos.encode("Hello").ids == [*vocab.processor.encode("Hello"), 2]
    assert with_eos.encode("Hello", add_special_tokens=False).ids == vocab.processor.encode("Hello")

    with pytest.raises(ValueError, match="'t5' is not supported"):
        build_gguf_tokenizer(_metadata_of(vocab, {"tokenizer.ggml.model": "t5"}))
    with pytest.raises(ValueError, match="512 tokens but 3 scores"):
        build_gguf_tokenizer(_metadata_of(vocab, {"tokenizer.ggml.scores": [0.0, 0.0, 0.0]}))


def test_engine_serves_sentencepiece_gguf(gguf_path: Path, vocab: SpmVocab) -> None:
    """The whole file through the engine: greedy tokens equal transformers' on the same weights, the
    streamed text equals the full decode, and a regex-constrained request (llguidance reading this
    tokenizer) obeys its pattern."""
    from tokenizers.decoders import DecodeStream

    parts = build_engine_parts(EngineConfig(model=str(gguf_path), dtype="float32", kv_cache_memory=8 * 2**20))
    ready = parts.ready
    assert ready.add_bos_token and ready.bos_token == "<s>" and ready.eos_token_ids == [2]
    tokenizer = Tokenizer.from_str(ready.tokenizer_json)
    prompt = [1, *tokenizer.encode("The quick brown fox", add_special_tokens=False).ids]
    assert prompt[1:] == vocab.processor.encode("The quick brown fox")

    stepper = EngineStepper(parts)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    regex = SamplingParams(max_tokens=16, seed=0, structured=StructuredSpec(regex=r"[a-z]{2,6} [0-9]{1,2}"))
    for request_id, params in (("greedy", greedy), ("regex", regex)):
        assert stepper.add(AddRequest(request_id, prompt, params, time.time()), b"test", []) is None
    outputs: dict[str, list[int]] = {"greedy": [], "regex": []}
    finish: dict[str, FinishReason | None] = {}
    deadline = time.monotonic() + 120
    while stepper.has_work and time.monotonic() < deadline:
        for _client, delta in stepper.step():
            assert delta.error is None, delta.error
            outputs[delta.request_id] += delta.new_token_ids
            finish[delta.request_id] = delta.finish_reason
        if not stepper.last_step_had_work:
            time.sleep(0.002)  # a grammar still compiling
    assert finish == {"greedy": FinishReason.LENGTH, "regex": FinishReason.STOP}

    hf_model = build_tiny_hf_model("llama")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert outputs["greedy"] == ids[len(prompt) :]

    # As the API process streams text: DecodeStream seeded with the prompt; it holds back an incomplete
    # character, whose bytes are decoded at the end (this random model emits stray byte tokens).
    stream = DecodeStream(ids=prompt[-8:], skip_special_tokens=True)
    streamed, pending = "", list[int]()
    for token_id in outputs["greedy"]:
        piece = stream.step(tokenizer, [token_id])
        pending = [*pending, token_id] if piece is None else []
        streamed += piece or ""
    streamed += tokenizer.decode(pending)
    full = tokenizer.decode(prompt + outputs["greedy"])
    assert full.startswith("The quick brown fox") and streamed == full[len("The quick brown fox") :]
    regex_text = tokenizer.decode([t for t in outputs["regex"] if t not in ready.eos_token_ids])
    assert re.fullmatch(r"[a-z]{2,6} [0-9]{1,2}", regex_text), regex_text
