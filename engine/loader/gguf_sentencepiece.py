"""SentencePiece vocabularies in GGUF (`tokenizer.ggml.model == "llama"`) as a `tokenizers.Tokenizer`.

GGUF keeps only the pieces, their scores and types. llama.cpp tokenizes such a vocabulary the way
SentencePiece's BPE model does: split the text into characters, then keep joining the adjacent pair whose
joined piece is in the vocabulary with the highest score; characters left without a piece become
`<0xNN>` byte tokens. A BPE whose merges are ranked by the score of the piece they make does the same.
llama.cpp applies that rule to every "llama" vocabulary (unigram-trained ones too), so we do as well.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

SPACE = "\u2581"  # SentencePiece's visible space ("▁")

# llama.cpp's fallbacks for files that leave these keys out.
SPM_DEFAULT_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
SPM_DEFAULT_ADD_BOS = True


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (SentencePiece's piece types)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


def spm_merges(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """BPE merges, best first, that reproduce SentencePiece's highest-score-first joining.

    Every way to cut a piece into two pieces is a merge, ranked by the joined piece's score. Control, byte
    and unknown pieces are never made by joining text, and unused ones are split again by SentencePiece.
    """
    joinable = {
        token: token_id
        for token_id, (token, kind) in enumerate(zip(tokens, token_types, strict=True))
        if kind in (TokenType.NORMAL, TokenType.USER_DEFINED)
    }
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, piece_id in joinable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in joinable and right in joinable:
                # Equal scores: the lower id first (SentencePiece would take the leftmost pair instead).
                ranked.append((-scores[piece_id], piece_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_spm_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    num_tokens = len(tokens)
    scores = [float(s) for s in metadata.get("tokenizer.ggml.scores") or [0.0] * num_tokens]
    token_types = [
        int(t) for t in metadata.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * num_tokens
    ]
    if not len(scores) == len(token_types) == num_tokens:
        raise ValueError(
            f"GGUF tokenizer has {num_tokens} tokens but {len(scores)} scores and {len(token_types)} token types"
        )
    unk_id = special_token_id(metadata, "unknown_token_id")
    model = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=spm_merges(tokens, scores, token_types),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)

    # llama.cpp puts a space before each stretch of text that starts the input or follows a special token;
    # a normalizer runs on exactly those stretches, after added tokens are split off.
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    tokenizer.pre_tokenizer = None  # pieces may span several words ("▁▁▁"), as in SentencePiece
    tokenizer.decoder = _decoder(add_space_prefix)

    # Control and unknown tokens match whole and are skipped on decode; user-defined ones match whole
    # but decode as text (llama.cpp splits all three out of the input before tokenizing the rest).
    special_types = (TokenType.CONTROL, TokenType.UNKNOWN)
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind in special_types
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, token_types, strict=True)
            if kind == TokenType.USER_DEFINED
        ]
    )
    tokenizer.post_processor = _post_processor(metadata, tokens)
    return tokenizer


def _decoder(add_space_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # the space added in front
    return decoders.Sequence(steps)


def _post_processor(metadata: dict[str, Any], tokens: list[str]) -> processors.PostProcessor | None:
    """BOS / EOS for `encode(add_special_tokens=True)`, as llama.cpp adds them with add_special."""
    marks: dict[str, tuple[str, int]] = {}
    for key, flag, default in (
        ("bos_token_id", "add_bos_token", SPM_DEFAULT_ADD_BOS),
        ("eos_token_id", "add_eos_token", False),
    ):
        token_id = special_token_id(metadata, key)
        if token_id is not None and bool(metadata.get(f"tokenizer.ggml.{flag}", default)):
            marks[key] = (tokens[token_id], token_id)
    if not marks:
        return None
    bos = [marks["bos_token_id"][0]] if "bos_token_id" in marks else []
    eos = [marks["eos_token_id"][0]] if "eos_token_id" in marks else []
    return processors.TemplateProcessing(
        single=[*bos, "$A", *eos],
        pair=[*bos, "$A", *eos, *bos, "$B", *eos],
        special_tokens=list(marks.values()),
    )


def special_token_id(metadata: dict[str, Any], key: str) -> int | None:
    """`tokenizer.ggml.<key>` for a SentencePiece vocabulary, with llama.cpp's defaults; None if out of range."""
    value = metadata.get(f"tokenizer.ggml.{key}", SPM_DEFAULT_SPECIAL_IDS.get(key))
    num_tokens = len(metadata["tokenizer.ggml.tokens"])
    return int(value) if value is not None and 0 <= int(value) < num_tokens else None
