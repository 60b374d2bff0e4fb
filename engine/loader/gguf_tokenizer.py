"""Builds a `tokenizers.Tokenizer` (and TokenizerInfo) from a GGUF file's tokenizer metadata: byte-level
BPE ("gpt2") here, SentencePiece ("llama") in gguf_sentencepiece.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from contract.byte_alphabet import BYTE_TO_UNICODE
from engine.loader.gguf_sentencepiece import (
    SPM_DEFAULT_ADD_BOS,
    TokenType,
    build_spm_tokenizer,
    special_token_id,
)
from engine.loader.tokenizer_info import TokenizerInfo, unique_ids

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

# `tokenizer.ggml.pre` values whose word split differs from GPT-2's built-in regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_level_spelling(token: str, alphabet: Mapping[int, str], spelled: set[str]) -> str:
    # Vocabulary entries are already byte-level spelled; a few files store raw text for some.
    if set(token) <= spelled:
        return token
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def build_gguf_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type == "llama":
        return build_spm_tokenizer(metadata)
    if model_type != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {model_type!r} is not supported "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
        )
    return _build_byte_level_bpe(metadata)


def _build_byte_level_bpe(metadata: dict[str, Any]) -> Tokenizer:
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    token_types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [])
    alphabet = BYTE_TO_UNICODE
    spelled = set(alphabet.values())
    vocab = {_byte_level_spelling(t, alphabet, spelled): i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))

    split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) must match whole and be skippable on decode; user-defined
    # ones match whole but are ordinary text.
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types, strict=False)
        if kind == TokenType.CONTROL and set(t) <= spelled
    ]
    user_defined = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types, strict=False)
        if kind == TokenType.USER_DEFINED
    ]
    tokenizer.add_special_tokens(control)
    tokenizer.add_tokens(user_defined)
    return tokenizer


def gguf_tokenizer_info(metadata: dict[str, Any]) -> TokenizerInfo:
    tokenizer = build_gguf_tokenizer(metadata)
    tokens = metadata["tokenizer.ggml.tokens"]
    is_spm = metadata.get("tokenizer.ggml.model") == "llama"

    def token_id_for(key: str) -> int | None:
        if is_spm:  # llama.cpp's default ids apply to keys the file leaves out
            return special_token_id(metadata, key)
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return int(token_id) if token_id is not None and 0 <= token_id < len(tokens) else None

    def token_for(key: str) -> str | None:
        token_id = token_id_for(key)
        return None if token_id is None else tokens[token_id]

    eos_ids = [
        token_id
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
        if (token_id := token_id_for(key)) is not None
    ]
    special = {
        name: text
        for name, key in (("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id"))
        if (text := token_for(key)) is not None
    }
    return TokenizerInfo(
        tokenizer_json=tokenizer.to_str(),
        chat_template=metadata.get("tokenizer.chat_template"),
        bos_token=token_for("bos_token_id"),
        eos_token=token_for("eos_token_id"),
        eos_token_ids=unique_ids(eos_ids),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", is_spm and SPM_DEFAULT_ADD_BOS)),
        special_tokens=special,
    )
