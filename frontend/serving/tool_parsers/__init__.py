"""Tool-call parsers by `--tool-call-parser` name."""

from __future__ import annotations

from frontend.serving.tool_parsers.base import ExtractedToolCalls, StreamDelta, ToolCall, ToolParser
from frontend.serving.tool_parsers.hermes import HermesToolParser
from frontend.serving.tool_parsers.json_calls import JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "json": JsonToolParser}

__all__ = [
    "TOOL_PARSERS",
    "ExtractedToolCalls",
    "HermesToolParser",
    "JsonToolParser",
    "StreamDelta",
    "ToolCall",
    "ToolParser",
]
