"""Reads a JSON request body with a size cap, so an oversized upload is refused without buffering it all;
the body must be declared JSON and nest no deeper than a bound, checked before any decoding."""

from __future__ import annotations

from starlette.requests import Request

from frontend.errors import APIError, invalid_request, too_large
from frontend.offload import run_sized

# Deep enough for any real schema or tool definition; far below the ~1,000 levels where msgspec, json and
# jinja hit Python's recursion limit (a RecursionError would be a 500).
MAX_JSON_DEPTH = 128

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SCAN_CHUNK = 4 << 20  # bytes per vectorized step: bounds the scan's temporary arrays to ~20 MB


def check_content_type(request: Request) -> None:
    """400 unless the body is declared JSON. A form or text/plain body is what a cross-origin browser page
    can send without a CORS preflight, so accepting one would let any site start generations."""
    declared = request.headers.get("content-type", "")
    media_type = declared.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    shown = media_type or "none"
    raise APIError(
        f"Unsupported Content-Type {shown!r}: request bodies must be sent as 'application/json'.",
        status=400,
        code="unsupported_media_type",
    )


def json_depth_exceeds(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body`'s arrays and objects nest deeper than `max_depth`, ignoring brackets inside strings.
    Every step is a C-level bytes operation (a 64 MB body takes well under a second), and most bodies
    hold fewer brackets than the bound, which answers at once."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    # Drop escaped backslashes, then escaped quotes: what is left splits on '"' into outside/inside runs.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    return _max_depth(brackets) > max_depth


def _max_depth(brackets: bytes) -> int:
    """The deepest nesting of a string of brackets, by a running sum in numpy (a 64 MB body takes a
    fraction of a second, where a Python loop took seconds)."""
    import numpy as np

    step = np.zeros(256, dtype=np.int8)
    step[list(b"[{")] = 1
    step[list(b"]}")] = -1
    depth, deepest = 0, 0
    for start in range(0, len(brackets), _SCAN_CHUNK):
        chunk = np.frombuffer(
            brackets, dtype=np.uint8, count=min(_SCAN_CHUNK, len(brackets) - start), offset=start
        )
        running = np.cumsum(step[chunk], dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
    return deepest


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body of a JSON request: 400 for another content type or too deep nesting, 413 past `limit`."""
    check_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if await run_sized(len(body), json_depth_exceeds, body):
        raise invalid_request(f"The JSON body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels.")
    return body
