"""Server-sent-events framing and the one JSON encoder the routes share."""

from __future__ import annotations

from typing import Any

import msgspec

from frontend.errors import APIError

# Built once: msgspec encoders keep internal buffers and are much faster reused.
_encoder = msgspec.json.Encoder()

SSE_DONE: bytes = b"data: [DONE]\n\n"


def json_bytes(obj: Any) -> bytes:
    """Compact JSON for dicts, lists and msgspec Structs (non-ASCII kept as UTF-8)."""
    return _encoder.encode(obj)


def sse_data(payload: bytes) -> bytes:
    """One SSE event carrying `payload` (already-encoded JSON, which never contains a raw newline)."""
    return b"data: " + payload + b"\n\n"


def sse_error(err: APIError) -> bytes:
    """A mid-stream error as a data event, the way vLLM reports it: `{"error": {...}}`."""
    return sse_data(_encoder.encode(err.body()))
