"""parse_tool_output, the one place a finished choice's text becomes content + tool calls (server chat,
batch chat and the offline LLM.chat all call it), and apply_tool_calls, its server-side dict form."""

from __future__ import annotations

import json
from typing import Any

import pytest

from frontend.errors import APIError
from frontend.serving.tools import (
    MAX_REQUIRED_TOOLS,
    ToolPlan,
    ToolSettings,
    ToolStream,
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
    # Cut short by max_tokens: the partial call, no content, finish reason "length" (as vLLM).
    cut = parse_tool_output('{"city": "Ro', "length", named)
    assert cut.content is None and cut.finish_reason == "length"
    assert [(c.name, c.arguments) for c in cut.tool_calls] == [("get_weather", '{"city": "Ro')]
    # An unfinished stop (not cut by length) is still plain content.
    assert parse_tool_output('{"city": "Ro', "stop", named).tool_calls == []


def test_required_calls_cut_by_length_keep_the_finished_and_the_partial_call() -> None:
    text = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Ro'
    out = parse_tool_output(text, "length", plan("required"))
    assert out.content is None and out.finish_reason == "length"
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_time", "{}"),
        ("get_weather", '{"city": "Ro'),
    ]
    assert all(c.id.startswith("chatcmpl-tool-") for c in out.tool_calls)
    # Cut before any name was written: nothing to call, so the text stays content.
    early = parse_tool_output('[{"na', "length", plan("required"))
    assert (early.content, early.tool_calls) == ('[{"na', [])


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


@pytest.mark.parametrize(
    ("tool_choice", "text"),
    [
        ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Oslo"}'),
        ("required", '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
        ("auto", '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'),
    ],
    ids=["named", "required", "auto"],
)
def test_stream_chunks_carry_one_entry_per_call_index(tool_choice: Any, text: str) -> None:
    """OpenAI sends one `delta.tool_calls` entry per index per chunk; the opening entry (id, name) and
    the first argument characters of the same text delta are merged, so `tool_calls[0]` loses nothing."""
    stream = ToolStream(plan(tool_choice))
    body, finish = stream.step(text, "stop")  # the whole call in one delta: the worst case
    assert finish == "tool_calls" and "content" not in body
    (entry,) = body["tool_calls"]
    assert entry["index"] == 0 and entry["id"].startswith("chatcmpl-tool-") and entry["type"] == "function"
    assert entry["function"]["name"] == "get_weather"
    assert json.loads(entry["function"]["arguments"]) == {"city": "Oslo"}
    # Two calls in one delta stay two entries, one per index, in index order.
    two = ToolStream(plan("required")).step(
        '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "X"}}]', "stop"
    )[0]["tool_calls"]
    assert [(e["index"], e["function"]["name"], e["function"]["arguments"]) for e in two] == [
        (0, "get_time", "{}"),
        (1, "get_weather", '{"city": "X"}'),
    ]


def test_required_with_more_tools_than_the_grammar_allows_is_400() -> None:
    tools = [{"type": "function", "function": {"name": f"tool_{i}"}} for i in range(MAX_REQUIRED_TOOLS + 1)]
    with pytest.raises(APIError) as info:
        plan_tool_choice(tools, "required", parallel_tool_calls=None, settings=HERMES)
    assert info.value.status == 400 and info.value.param == "tools"
    assert f"at most {MAX_REQUIRED_TOOLS} tools" in info.value.message
    planned = plan_tool_choice(tools[:-1], "required", parallel_tool_calls=None, settings=HERMES)
    assert planned is not None and planned.structured is not None
    # "auto" and a named function build no alternative per tool: no cap there.
    assert plan_tool_choice(tools, "auto", parallel_tool_calls=None, settings=HERMES) is not None
    named = {"type": "function", "function": {"name": "tool_7"}}
    assert plan_tool_choice(tools, named, parallel_tool_calls=None, settings=HERMES) is not None
