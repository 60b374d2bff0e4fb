"""Tool calls written as JSON objects `{"name": ..., "arguments": {...}}`, alone or in an array: the
`json` parser, plus the incremental call streamer that the Hermes parser shares.

Arguments are passed on as the exact JSON text the model wrote, so a stream's argument fragments
always join to the same string a non-streamed response carries.
"""

from __future__ import annotations

import json
import re
from typing import Any

from frontend.serving.tool_parsers.base import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolParser,
    new_tool_call_id,
)

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')
_decoder = json.JSONDecoder()


def parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of one complete call object, or None when the text is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments already as a JSON string
        return obj["name"], args
    match = _ARGUMENTS.search(body)
    if match is not None:
        try:
            value, end = _decoder.raw_decode(body, match.end())
        except ValueError:
            value, end = None, None
        if end is not None and value == args:
            return obj["name"], body[match.end() : end]
    return obj["name"], json.dumps(args, ensure_ascii=False)


def object_spans(text: str) -> list[tuple[int, int | None]]:
    """Spans of the top-level object, or of the objects directly inside a top-level array; the end is
    None while an object is still open."""
    spans: list[tuple[int, int | None]] = []
    depth, in_string, escaped, start = 0, False, False, None
    in_array = text.lstrip()[:1] == "["
    item_depth = 2 if in_array else 1
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            if ch == "{" and depth == item_depth:
                start = i
        elif ch in "}]":
            if ch == "}" and depth == item_depth and start is not None:
                spans.append((start, i + 1))
                start = None
            depth -= 1
    if start is not None:
        spans.append((start, None))
    return spans


class CallStreamer:
    """Turns the growing text of one call object into OpenAI tool-call deltas: the id, type and name
    first (once the name is known), then argument fragments."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.id = new_tool_call_id()
        self.name: str | None = None
        self._args_start: int | None = None
        self._num_args_sent = 0

    def update(self, body: str, *, complete: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if self.name is None:
            match = _NAME.search(body)
            if match is None:
                return deltas
            self.name = json.loads(f'"{match.group(1)}"')
            function = {"name": self.name, "arguments": ""}
            deltas.append({"index": self.index, "id": self.id, "type": "function", "function": function})
        if self._args_start is None:
            match = _ARGUMENTS.search(body)
            if match is None and complete and not self._num_args_sent:
                self._num_args_sent = 2  # a call without arguments: "{}", as parse_call() says
                deltas.append({"index": self.index, "function": {"arguments": "{}"}})
            if match is None or match.end() >= len(body):
                return deltas  # the value has not started yet; its start may still move over spaces
            self._args_start = match.end()
        fragment = self._arguments_fragment(body)
        if fragment:
            deltas.append({"index": self.index, "function": {"arguments": fragment}})
        return deltas

    def _arguments_fragment(self, body: str) -> str:
        start = self._args_start
        assert start is not None  # set by update() before this is called
        try:
            value, end = _decoder.raw_decode(body, start)
        except ValueError:
            value, end = None, None
        if body[start] == '"':  # arguments given as a JSON string: send the decoded text once, whole
            if end is None or self._num_args_sent:
                return ""
            self._num_args_sent = 1
            return str(value)
        # While the value is still open, everything after its start belongs to it.
        text = body[start:end] if end is not None else body[start:]
        fragment = text[self._num_args_sent :]
        self._num_args_sent = max(self._num_args_sent, len(text))
        return fragment


class JsonToolParser(ToolParser):
    """Output that is a JSON call object (or an array of them) is tool calls; anything else is content."""

    def __init__(self, tool_names: frozenset[str] | None = None) -> None:
        super().__init__(tool_names)
        self._buffer = ""
        self._mode: str | None = None  # None (undecided), "content" or "calls"
        self._streamers: dict[int, CallStreamer] = {}  # by the offset where the call's object starts

    def _is_call(self, name: str | None) -> bool:
        return name is not None and (self.tool_names is None or name in self.tool_names)

    def extract(self, text: str) -> ExtractedToolCalls:
        stripped = text.strip()
        if stripped[:1] not in ("{", "["):
            return ExtractedToolCalls(text, [])
        try:
            json.loads(stripped)
        except ValueError:
            return ExtractedToolCalls(text, [])
        calls = []
        for start, end in object_spans(text):
            parsed = parse_call(text[start:end]) if end is not None else None
            if parsed is None or not self._is_call(parsed[0]):
                return ExtractedToolCalls(text, [])
            calls.append(ToolCall(new_tool_call_id(), *parsed))
        return ExtractedToolCalls(None, calls) if calls else ExtractedToolCalls(text, [])

    def feed(self, text: str) -> StreamDelta:
        self._buffer += text
        if self._mode is None:
            head = self._buffer.lstrip()
            if not head:
                return StreamDelta()
            if head[0] not in "{[":
                self._mode = "content"
                return StreamDelta(self._buffer)
            spans = object_spans(self._buffer)
            name = self._first_name(spans)
            if name is None:
                return StreamDelta()  # hold: not yet known whether this JSON is a call
            if not self._is_call(name):
                self._mode = "content"
                return StreamDelta(self._buffer)
            self._mode = "calls"
        if self._mode == "content":
            return StreamDelta(text)
        return self._stream_calls(complete=False)

    def finish(self) -> StreamDelta:
        if self._mode == "calls":
            return self._stream_calls(complete=True)
        if self._mode is None:
            self._mode = "content"
            return StreamDelta(self._buffer)
        return StreamDelta()

    def _first_name(self, spans: list[tuple[int, int | None]]) -> str | None:
        if not spans:
            return None
        start, end = spans[0]
        match = _NAME.search(self._buffer[start:end])
        return json.loads(f'"{match.group(1)}"') if match else None

    def _stream_calls(self, *, complete: bool) -> StreamDelta:
        out = StreamDelta()
        for start, end in object_spans(self._buffer):
            body = self._buffer[start:end]
            streamer = self._streamers.get(start)
            if streamer is None:
                match = _NAME.search(body)
                if match is None or not self._is_call(json.loads(f'"{match.group(1)}"')):
                    continue  # not (yet) a known call: nothing to stream
                streamer = self._streamers[start] = CallStreamer(len(self._streamers))
            out.tool_calls += streamer.update(body, complete=complete or end is not None)
        self.num_calls = len(self._streamers)
        return out
