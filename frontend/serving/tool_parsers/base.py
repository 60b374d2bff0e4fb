"""What every tool-call parser produces: whole calls for a finished text, and OpenAI-style stream deltas."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON text, as OpenAI sends it

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ExtractedToolCalls:
    content: str | None  # text outside the calls; None when there is none
    tool_calls: list[ToolCall]


@dataclass
class StreamDelta:
    """What one text delta becomes: plain content, and `delta.tool_calls` entries."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, other: StreamDelta) -> StreamDelta:
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


class ToolParser(ABC):
    """One choice's parser; `feed` and `finish` keep state across a stream, `extract` is stateless."""

    def __init__(self, tool_names: frozenset[str] | None = None) -> None:
        self.tool_names = tool_names  # None: accept any name
        self.num_calls = 0  # calls started so far in the stream

    @abstractmethod
    def extract(self, text: str) -> ExtractedToolCalls:
        """Tool calls in a complete model output."""

    @abstractmethod
    def feed(self, text: str) -> StreamDelta:
        """The next piece of streamed model output."""

    @abstractmethod
    def finish(self) -> StreamDelta:
        """The stream ended: release anything held back."""
