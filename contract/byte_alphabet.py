"""GPT-2's reversible map of the 256 byte values to printable characters: the alphabet byte-level BPE
vocabularies are spelled in. The engine spells GGUF vocabularies with it; the API process reads bytes back."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType


def _byte_to_unicode() -> dict[int, str]:
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    next_free = 256  # bytes without a printable character of their own get 256, 257, ... in byte order
    for b in range(256):
        if b not in table:
            table[b] = chr(next_free)
            next_free += 1
    return table


BYTE_TO_UNICODE: Mapping[int, str] = MappingProxyType(_byte_to_unicode())
UNICODE_TO_BYTE: Mapping[str, int] = MappingProxyType({char: byte for byte, char in BYTE_TO_UNICODE.items()})
