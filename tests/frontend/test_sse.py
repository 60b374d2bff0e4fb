"""SSE framing and the shared JSON encoder."""

from __future__ import annotations

import json

import msgspec

from frontend.errors import invalid_request
from frontend.sse import SSE_DONE, json_bytes, sse_data, sse_error


class Point(msgspec.Struct):
    x: int
    label: str


def test_sse_data_frames_one_event() -> None:
    assert sse_data(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_sse_error_is_a_data_event_with_the_error_body() -> None:
    event = sse_error(invalid_request("bad stop", "stop"))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[len(b"data: ") : -2]) == {
        "error": {"message": "bad stop", "type": "invalid_request_error", "param": "stop", "code": None}
    }


def test_json_bytes_is_compact_utf8_and_encodes_structs() -> None:
    payload = json_bytes({"text": "héllo 🎉\nnext", "n": [1, 2], "p": Point(3, "q")})
    assert payload == '{"text":"héllo 🎉\\nnext","n":[1,2],"p":{"x":3,"label":"q"}}'.encode()
    # A newline in the text is escaped, so one payload is always one SSE line.
    assert b"\n" not in payload
    assert json.loads(payload)["text"] == "héllo 🎉\nnext"
