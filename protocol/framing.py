"""Framing: `[tag (1 byte), msgpack body, *raw buffers]`, with encoders/decoders built once."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import msgspec

from protocol.messages import (
    Abort,
    AddRequest,
    EngineDead,
    Heartbeat,
    Hello,
    LoadLora,
    LoraResult,
    Outputs,
    Ready,
    Refused,
    UnloadLora,
)


class Tag(bytes, enum.Enum):
    HELLO = b"H"
    READY = b"R"
    REFUSED = b"X"
    ADD = b"A"
    ABORT = b"C"
    OUTPUTS = b"O"
    HEARTBEAT = b"B"
    ENGINE_DEAD = b"D"
    LOAD_LORA = b"L"
    UNLOAD_LORA = b"U"
    LORA_RESULT = b"Q"


MESSAGE_TYPES: dict[Tag, type] = {
    Tag.HELLO: Hello,
    Tag.READY: Ready,
    Tag.REFUSED: Refused,
    Tag.ADD: AddRequest,
    Tag.ABORT: Abort,
    Tag.OUTPUTS: Outputs,
    Tag.HEARTBEAT: Heartbeat,
    Tag.ENGINE_DEAD: EngineDead,
    Tag.LOAD_LORA: LoadLora,
    Tag.UNLOAD_LORA: UnloadLora,
    Tag.LORA_RESULT: LoraResult,
}
TAG_OF: dict[type, Tag] = {cls: tag for tag, cls in MESSAGE_TYPES.items()}

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Tag, msgspec.msgpack.Decoder[Any]] = {
    tag: msgspec.msgpack.Decoder(cls) for tag, cls in MESSAGE_TYPES.items()
}
_tags_by_value = {tag.value: tag for tag in Tag}


class FrameError(ValueError):
    """A message that could not be decoded: dropped and counted by the receiver, never fatal."""


def encode(message: Any, buffers: Sequence[bytes | memoryview] = ()) -> list[bytes | memoryview]:
    """Frames for one message: tag, body, then any raw buffers (tensor data)."""
    return [TAG_OF[type(message)].value, _encoder.encode(message), *buffers]


def decode(frames: Sequence[bytes | memoryview]) -> tuple[Any, list[bytes | memoryview]]:
    """(message, extra raw frames). Raises FrameError on anything malformed."""
    if len(frames) < 2:
        raise FrameError(f"expected at least 2 frames, got {len(frames)}")
    tag = _tags_by_value.get(bytes(frames[0]))
    if tag is None:
        raise FrameError(f"unknown message tag {bytes(frames[0])[:8]!r}")
    try:
        message = _decoders[tag].decode(frames[1])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FrameError(f"bad {tag.name} body: {exc}") from exc
    return message, list(frames[2:])
