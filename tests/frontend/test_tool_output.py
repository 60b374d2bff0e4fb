"""parse_tool_output, the one place a finished choice's text becomes content + tool calls (server chat,
batch chat and the offline LLM.chat all call it), and apply_tool_calls, its server-side dict form."""

from __future__ import annotations

import json
from typing import Any

import pytest

from frontend.serving.tools import (
    ToolPlan,
    ToolSettings,
    apply_tool_calls,
    parse_tool_output,
    plan_tool_choice,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
HERMES = ToolSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")
CALL_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def plan(tool_choice: Any) -> ToolPlan:
    planned = plan_tool_choice([WEATHER, TIME], tool_choice, parallel_tool_calls=None, settings=HERMES)
    assert planned is not None
    return planned


def test_without_a_plan_the_text_is_content() -> None:
    out = parse_tool_output(CALL_TEXT, "stop", None)
    assert (out.content, out.tool_calls, out.finish_reason) == (CALL_TEXT, [], "stop")


def test_auto_hermes_call_leaves_the_text_before_it() -> None:
    out = parse_tool_output(CALL_TEXT, "stop", plan("auto"))
    assert out.content == "Checking.\n" and out.finish_reason == "tool_calls"
    (call,) = out.tool_calls
    assert call.id.startswith("chatcmpl-tool-") and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Oslo"}
    only_call = parse_tool_output(CALL_TEXT.removeprefix("Checking.\n"), "stop", plan("auto"))
    assert only_call.content is None and len(only_call.tool_calls) == 1


@pytest.mark.parametrize(
    "text",
    ["Just words.", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'],
    ids=["plain", "broken-call"],
)
def test_auto_text_without_a_valid_call_stays_content(text: str) -> None:
    out = parse_tool_output(text, "stop", plan("auto"))
    assert (out.content, out.tool_calls, out.finish_reason) == (text, [], "stop")


def test_required_and_named_forced_outputs() -> None:
    required = (
        '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]'
    )
    out = parse_tool_output(required, "stop", plan("required"))
    assert out.content is None and out.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("get_time", {}),
        ("get_weather", {"city": "Rome"}),
    ]
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    out = parse_tool_output('{"city": "Rome"}', "stop", named)
    assert out.content is None and [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_weather", '{"city": "Rome"}')
    ]
    # Cut short by max_tokens: not JSON, so no call, and the finish reason stays "length".
    cut = parse_tool_output('{"city": "Ro', "length", named)
    assert (cut.content, cut.tool_calls, cut.finish_reason) == ('{"city": "Ro', [], "length")


def test_a_call_cut_by_length_keeps_length() -> None:
    out = parse_tool_output(CALL_TEXT, "length", plan("auto"))
    assert out.tool_calls and out.finish_reason == "length"


def test_apply_tool_calls_writes_the_server_message() -> None:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": CALL_TEXT, "tool_calls": []},
        "finish_reason": "stop",
    }
    apply_tool_calls(choice, CALL_TEXT, plan("auto"))
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking.\n"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    plain: dict[str, Any] = {"message": {"content": "Hi", "tool_calls": []}, "finish_reason": "stop"}
    apply_tool_calls(plain, "Hi", plan("auto"))
    assert plain == {"message": {"content": "Hi", "tool_calls": []}, "finish_reason": "stop"}
