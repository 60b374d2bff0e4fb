"""OpenAI's names for the wire's finish reasons (the responses' `finish_reason`, the metrics' label)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from protocol.messages import FinishReason

FINISH_REASON_NAMES: Mapping[FinishReason, str] = MappingProxyType(
    {
        FinishReason.STOP: "stop",
        FinishReason.LENGTH: "length",
        FinishReason.ABORT: "abort",
        FinishReason.ERROR: "error",
    }
)
