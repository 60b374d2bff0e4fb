"""Tandem's wire contract: msgspec structs and framing. Depends on msgspec and the standard library only."""

from protocol.framing import FrameError, Tag, decode, encode
from protocol.messages import *  # noqa: F403
from protocol.messages import PROTOCOL_VERSION, FinishReason

__all__ = ["PROTOCOL_VERSION", "FinishReason", "FrameError", "Tag", "decode", "encode"]
