"""Incremental detokenization of generated tokens, and per-token text and bytes for logprobs."""

from __future__ import annotations

import re

import tokenizers
from tokenizers.decoders import DecodeStream

from contract.byte_alphabet import UNICODE_TO_BYTE


class IncrementalDetokenizer:
    """Turns each batch of new token ids into the text it adds, holding back incomplete UTF-8 characters.

    Built on `tokenizers.decoders.DecodeStream` seeded with the prompt, so the first generated token is
    decoded in context (e.g. SentencePiece's leading-space rule sees that it is not the start of the text).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # DecodeStream only needs the last few prompt tokens as context; a long prompt would cost a
        # decode of all of it at the first step.
        self._stream = DecodeStream(ids=list(prompt_token_ids[-8:]), skip_special_tokens=skip_special_tokens)
        self.output_token_ids: list[int] = []
        self._num_pending = 0  # tokens pushed since the stream last produced text
        self.text = ""  # all text emitted so far

    def push(self, token_ids: list[int]) -> str:
        """The new text these tokens add; "" while a multi-byte character is still incomplete."""
        if not token_ids:
            return ""
        self.output_token_ids.extend(token_ids)
        new = self._stream.step(self._tokenizer, list(token_ids))
        if new is None:
            self._num_pending += len(token_ids)
            return ""
        self._num_pending = 0
        self.text += new
        return new

    def finish(self) -> str:
        """At the end of generation: the text of tokens still held back (an incomplete character comes out
        as U+FFFD, as a full `decode` would show it)."""
        if not self._num_pending:
            return ""
        pending = self.output_token_ids[-self._num_pending :]
        self._num_pending = 0
        tail = self._tokenizer.decode(pending, skip_special_tokens=self._skip_special_tokens)
        self.text += tail
        return tail


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TokenizerFacts:
    """What token_bytes needs to know about a tokenizer, computed once (it costs a JSON dump)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer  # held so that its id() is not reused while cached
        self.added = {
            token_id: token.content for token_id, token in tokenizer.get_added_tokens_decoder().items()
        }
        decoder = tokenizer.decoder
        state = decoder.__getstate__().decode() if decoder is not None else ""
        if '"ByteLevel"' in state:
            self.kind = "byte_level"
        elif '"ByteFallback"' in state or '"Metaspace"' in state:
            self.kind = "sentencepiece"
        else:
            self.kind = "text"


_facts: dict[int, _TokenizerFacts] = {}


def _facts_of(tokenizer: tokenizers.Tokenizer) -> _TokenizerFacts:
    facts = _facts.get(id(tokenizer))
    if facts is None or facts.tokenizer is not tokenizer:
        facts = _facts[id(tokenizer)] = _TokenizerFacts(tokenizer)
    return facts


def token_bytes(tokenizer: tokenizers.Tokenizer, token_id: int) -> list[int]:
    """The exact UTF-8 bytes a token contributes (may be part of a character), for OpenAI's `bytes` field."""
    facts = _facts_of(tokenizer)
    added = facts.added.get(token_id)
    if added is not None:
        return list(added.encode())
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return []
    if facts.kind == "byte_level" and all(char in UNICODE_TO_BYTE for char in piece):
        return [UNICODE_TO_BYTE[char] for char in piece]
    if facts.kind == "sentencepiece":
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return [int(fallback.group(1), 16)]
        return list(piece.replace("\u2581", " ").encode())
    return list(tokenizer.decode([token_id], skip_special_tokens=False).encode())


def token_text(tokenizer: tokenizers.Tokenizer, token_id: int) -> str:
    """A token's text for logprobs; bytes that do not form whole characters show as U+FFFD."""
    return bytes(token_bytes(tokenizer, token_id)).decode("utf-8", errors="replace")
