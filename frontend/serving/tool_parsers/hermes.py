"""Hermes-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of
them after optional plain content."""

from __future__ import annotations

from frontend.serving.tool_parsers.base import (
    ExtractedToolCalls,
    StreamDelta,
    ToolCall,
    ToolParser,
    new_tool_call_id,
)
from frontend.serving.tool_parsers.json_calls import CallStreamer, parse_call

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"


def split_calls(text: str) -> tuple[str, list[tuple[str, bool]]]:
    """(content before the first call, [(call body, closed)]); text after a closed call that opens no
    other call is dropped, as tool-calling models put nothing meaningful there."""
    pos = text.find(OPEN_TAG)
    if pos < 0:
        return text, []
    content, bodies = text[:pos], []
    while pos >= 0:
        start = pos + len(OPEN_TAG)
        end = text.find(CLOSE_TAG, start)
        if end < 0:
            bodies.append((text[start:], False))
            break
        bodies.append((text[start:end], True))
        pos = text.find(OPEN_TAG, end + len(CLOSE_TAG))
    return content, bodies


def _partial_tag_length(text: str) -> int:
    """Length of the longest end of `text` that could be the start of the opening tag."""
    for n in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if text.endswith(OPEN_TAG[:n]):
            return n
    return 0


class HermesToolParser(ToolParser):
    def __init__(self, tool_names: frozenset[str] | None = None) -> None:
        super().__init__(tool_names)
        self._buffer = ""
        self._num_content_sent = 0
        self._streamers: list[CallStreamer] = []

    def extract(self, text: str) -> ExtractedToolCalls:
        content, bodies = split_calls(text)
        calls = []
        for body, _closed in bodies:
            parsed = parse_call(body)
            if parsed is None:
                return ExtractedToolCalls(text, [])  # not valid calls: the model's text, unchanged
            calls.append(ToolCall(new_tool_call_id(), *parsed))
        if not calls:
            return ExtractedToolCalls(text, [])
        return ExtractedToolCalls(content if content.strip() else None, calls)

    def feed(self, text: str) -> StreamDelta:
        self._buffer += text
        return self._advance(complete=False)

    def finish(self) -> StreamDelta:
        return self._advance(complete=True)

    def _advance(self, *, complete: bool) -> StreamDelta:
        content, bodies = split_calls(self._buffer)
        # Hold back what may be the start of "<tool_call>" until the next piece shows what it is.
        safe = len(content) if bodies or complete else len(content) - _partial_tag_length(content)
        out = StreamDelta(content[self._num_content_sent : safe])
        self._num_content_sent = max(self._num_content_sent, safe)
        for index, (body, closed) in enumerate(bodies):
            if index == len(self._streamers):
                self._streamers.append(CallStreamer(index))
            out.tool_calls += self._streamers[index].update(body, complete=complete or closed)
        self.num_calls = sum(1 for s in self._streamers if s.name is not None)
        return out
