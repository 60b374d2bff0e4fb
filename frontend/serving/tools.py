"""Tool calling for chat: `tools` / `tool_choice` checks, the JSON schema that forces a call (required or
a named function) through structured outputs, and tool calls in responses and streams."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from frontend.config import FrontendConfig
from frontend.errors import invalid_request
from frontend.schemas import ChatCompletionRequest
from frontend.serving.tool_parsers import TOOL_PARSERS, JsonToolParser, StreamDelta, ToolParser
from frontend.serving.tool_parsers.base import ExtractedToolCalls, ToolCall, new_tool_call_id
from frontend.serving.tool_schema import arguments_schema, required_schema
from protocol.messages import StructuredSpec

TOOL_CHOICE_MODES = ("none", "auto", "required")
DEFAULT_MAX_TOOL_ARGUMENT_CHARS = 1000
# `tool_choice: "required"` compiles to one alternative per tool, and llguidance refuses a grammar row
# of more than 2,000 items (measured: 2,000 tools compile, 2,001 fail in the dry run with a parser message).
MAX_REQUIRED_TOOLS = 2_000


@dataclass(frozen=True)
class ToolSettings:
    """The server's tool flags (`--enable-auto-tool-choice`, `--tool-call-parser`,
    `--max-tool-argument-chars`)."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # maxLength given to open string arguments of forced calls; None leaves them open.
    max_tool_argument_chars: int | None = DEFAULT_MAX_TOOL_ARGUMENT_CHARS

    @classmethod
    def from_config(cls, config: FrontendConfig) -> ToolSettings:
        return cls(config.enable_auto_tool_choice, config.tool_call_parser, config.max_tool_argument_chars)


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "auto", "required" or "named"
    tool_names: frozenset[str]
    parser_name: str | None = None  # auto: the configured parser
    named: str | None = None  # named: the function the call must use
    structured: StructuredSpec | None = None  # required / named: the constraint that forces the call

    def new_parser(self) -> ToolParser:
        if self.mode == "named":
            assert self.named is not None  # set together with the mode by plan_tools()
            return NamedToolParser(self.named)
        if self.mode == "required":
            return JsonToolParser(self.tool_names)
        return TOOL_PARSERS[self.parser_name or "hermes"](self.tool_names)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> function definition, checking each tool's shape."""
    functions: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise invalid_request(f"`{param}` must be a tool object.", param)
        if tool.get("type", "function") != "function":
            raise invalid_request(f"`{param}.type` must be 'function'.", f"{param}.type")
        function = tool.get("function")
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise invalid_request(f"`{param}.function.name` is required.", f"{param}.function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid_request(
                f"`{param}.function.parameters` must be a JSON schema object.", f"{param}.function.parameters"
            )
        functions[function["name"]] = function
    return functions


def _named_choice(tool_choice: dict[str, Any]) -> str:
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise invalid_request(
            '`tool_choice` must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    return name


def plan_tools(req: ChatCompletionRequest, settings: ToolSettings) -> ToolPlan | None:
    """What tool handling a chat request needs; None when its output is plain content."""
    return plan_tool_choice(
        req.tools, req.tool_choice, parallel_tool_calls=req.parallel_tool_calls, settings=settings
    )


def plan_tool_choice(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    *,
    parallel_tool_calls: bool | None,
    settings: ToolSettings,
) -> ToolPlan | None:
    """`plan_tools` on the bare fields (the offline `LLM.chat` has no request body); 400s on bad input."""
    tools = tools or []
    if not isinstance(tools, list):  # the offline API passes these fields without a schema in front
        raise invalid_request("`tools` must be a list of tool objects.", "tools")
    if tool_choice is not None and not isinstance(tool_choice, str | dict):
        raise invalid_request("`tool_choice` must be a string or an object.", "tool_choice")
    functions = _functions(tools)
    choice = tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, str) and choice not in TOOL_CHOICE_MODES:
        raise invalid_request(
            f'`tool_choice` must be "none", "auto", "required" or a named function; got {choice!r}.',
            "tool_choice",
        )
    if choice == "none":
        return None
    if not tools:
        raise invalid_request("`tool_choice` needs `tools`.", "tool_choice")
    names = frozenset(functions)
    if choice == "auto":
        if not (settings.enable_auto_tool_choice and settings.tool_call_parser):
            raise invalid_request(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                "tool_choice",
            )
        return ToolPlan("auto", names, parser_name=settings.tool_call_parser)
    if choice == "required":
        if len(functions) > MAX_REQUIRED_TOOLS:
            raise invalid_request(
                f'`tool_choice` "required" supports at most {MAX_REQUIRED_TOOLS} tools; this request has '
                f'{len(functions)}. Send fewer tools, use "auto", or name the function.',
                "tools",
            )
        schema = required_schema(
            functions,
            parallel=parallel_tool_calls is not False,
            max_string_chars=settings.max_tool_argument_chars,
        )
        return ToolPlan("required", names, structured=StructuredSpec(json_schema=json.dumps(schema)))
    name = _named_choice(choice)  # type: ignore[arg-type]
    if name not in functions:
        raise invalid_request(
            f"`tool_choice` names function {name!r}, which is not in `tools`.", "tool_choice"
        )
    arguments = arguments_schema(functions[name], settings.max_tool_argument_chars)
    spec = StructuredSpec(json_schema=json.dumps(arguments))
    return ToolPlan("named", names, named=name, structured=spec)


class NamedToolParser(ToolParser):
    """A forced call to one function: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        super().__init__(frozenset({name}))
        self.name = name
        self.id = new_tool_call_id()

    def extract(self, text: str) -> ExtractedToolCalls:
        try:
            json.loads(text)
        except ValueError:
            return ExtractedToolCalls(text, [])  # cut short (max_tokens): not a call
        return ExtractedToolCalls(None, [ToolCall(self.id, self.name, text)])

    def feed(self, text: str) -> StreamDelta:
        out = StreamDelta()
        if self.num_calls == 0:
            self.num_calls = 1
            function = {"name": self.name, "arguments": ""}
            out.tool_calls.append({"index": 0, "id": self.id, "type": "function", "function": function})
        if text:
            out.tool_calls.append({"index": 0, "function": {"arguments": text}})
        return out

    def finish(self) -> StreamDelta:
        return StreamDelta()


@dataclass
class ToolOutput:
    """A finished choice's message: the content left around any calls, the calls, the finish reason."""

    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None


def merge_tool_call_deltas(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One `delta.tool_calls` entry per index, as OpenAI sends them: a call's opening entry (id, type,
    name) and argument fragments produced by the same text delta become one entry."""
    merged: dict[int, dict[str, Any]] = {}
    for entry in entries:
        into = merged.get(entry["index"])
        if into is None:
            merged[entry["index"]] = {**entry, "function": dict(entry["function"])}
            continue
        function = into["function"]
        function["arguments"] = function.get("arguments", "") + entry["function"].get("arguments", "")
    return list(merged.values())


def _cut_forced_calls(text: str, plan: ToolPlan) -> list[ToolCall]:
    """The calls of a forced (named / required) output cut off by max_tokens, the last one partial:
    what a stream would have sent, assembled (vLLM returns them as tool_calls too)."""
    parser = plan.new_parser()
    deltas = parser.feed(text).extend(parser.finish())
    calls = []
    for entry in merge_tool_call_deltas(deltas.tool_calls):
        function = entry["function"]
        calls.append(ToolCall(entry["id"], function["name"], function.get("arguments", "")))
    return calls


def parse_tool_output(text: str, finish_reason: str | None, plan: ToolPlan | None) -> ToolOutput:
    """What a finished choice's `text` becomes under `plan`: calls found take their text out of the content
    and turn finish reason "stop" into "tool_calls"; text without a valid call stays content, except a
    forced call cut off by max_tokens, which is returned as the partial call with finish reason "length"."""
    extracted = plan.new_parser().extract(text) if plan is not None else None
    if (
        plan is not None
        and plan.mode != "auto"
        and finish_reason == "length"
        and extracted is not None
        and not extracted.tool_calls
    ):
        extracted = ExtractedToolCalls(None, _cut_forced_calls(text, plan))
    if extracted is None or not extracted.tool_calls:
        return ToolOutput(text, [], finish_reason)
    finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return ToolOutput(extracted.content, extracted.tool_calls, finish_reason)


def apply_tool_calls(choice: dict[str, Any], text: str, plan: ToolPlan) -> None:
    """Rewrites a finished chat choice so calls found in `text` become `message.tool_calls`."""
    parsed = parse_tool_output(text, choice["finish_reason"], plan)
    if not parsed.tool_calls:
        return
    message = choice["message"]
    message["content"] = parsed.content
    message["tool_calls"] = [call.to_dict() for call in parsed.tool_calls]
    choice["finish_reason"] = parsed.finish_reason


class ToolStream:
    """One streamed choice: text deltas in, `delta` bodies (content and/or tool_calls) out."""

    def __init__(self, plan: ToolPlan) -> None:
        self.parser = plan.new_parser()

    def step(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        out = self.parser.feed(text) if text else StreamDelta()
        if finish_reason is not None:
            out.extend(self.parser.finish())
            if finish_reason == "stop" and self.parser.num_calls:
                finish_reason = "tool_calls"
        body: dict[str, Any] = {}
        if out.content:
            body["content"] = out.content
        if out.tool_calls:
            body["tool_calls"] = merge_tool_call_deltas(out.tool_calls)
        return body, finish_reason
