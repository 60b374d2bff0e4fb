"""Tool-call parsers and tool_choice planning: whole-text extraction, and streams (split at every possible
place) that reassemble to exactly the calls extraction finds."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from frontend.errors import APIError
from frontend.schemas import ChatCompletionRequest
from frontend.serving.tool_parsers import HermesToolParser, JsonToolParser, ToolParser
from frontend.serving.tool_schema import required_schema
from frontend.serving.tools import NamedToolParser, ToolSettings, plan_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMES = frozenset({"get_weather", "get_time"})

HERMES_TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"}\\" <x>", '
    '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)
JSON_ARRAY = (
    '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
)


def stream(parser: ToolParser, text: str, seed: int) -> tuple[str, list[dict[str, Any]]]:
    """Feeds `text` in random pieces; returns (content, [{"id", "name", "arguments"}]) as a client rebuilds them."""
    rng = random.Random(seed)
    content, calls = "", {}
    pos = 0
    deltas = []
    while pos < len(text):
        step = rng.randint(1, 6)
        deltas.append(parser.feed(text[pos : pos + step]))
        pos += step
    deltas.append(parser.finish())
    for delta in deltas:
        content += delta.content
        for entry in delta.tool_calls:
            index = entry["index"]
            if index not in calls:
                assert entry["id"].startswith("chatcmpl-tool-") and entry["type"] == "function"
                calls[index] = {"id": entry["id"], "name": entry["function"]["name"], "arguments": ""}
            else:
                assert "id" not in entry and "name" not in entry["function"]
            calls[index]["arguments"] += entry["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[i] for i in sorted(calls)]


def as_pairs(calls: list[Any]) -> list[tuple[str, str]]:
    return [(c["name"], c["arguments"]) if isinstance(c, dict) else (c.name, c.arguments) for c in calls]


def test_hermes_extracts_calls_and_content() -> None:
    found = HermesToolParser().extract(HERMES_TEXT)
    assert found.content == "Let me check.\n"
    assert [c.name for c in found.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(found.tool_calls[0].arguments) == {"city": 'Paris "}" <x>', "unit": "c"}
    assert found.tool_calls[1].arguments == "{}"
    assert len({c.id for c in found.tool_calls}) == 2


def test_hermes_text_without_valid_calls_is_content() -> None:
    for text in (
        "just words",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
    ):
        found = HermesToolParser().extract(text)
        assert found.content == text and not found.tool_calls


@pytest.mark.parametrize("seed", range(8))
def test_hermes_stream_reassembles_to_extraction(seed: int) -> None:
    content, calls = stream(HermesToolParser(), HERMES_TEXT, seed)
    found = HermesToolParser().extract(HERMES_TEXT)
    assert content == found.content
    assert as_pairs(calls) == as_pairs(found.tool_calls)


def test_hermes_stream_holds_back_only_a_partial_tag() -> None:
    parser = HermesToolParser()
    assert parser.feed("a <tool").content == "a "
    assert parser.feed("box> b").content == "<toolbox> b"
    assert parser.finish().content == ""


@pytest.mark.parametrize("seed", range(8))
def test_json_parser_array_object_and_content(seed: int) -> None:
    found = JsonToolParser(NAMES).extract(JSON_ARRAY)
    assert found.content is None
    assert as_pairs(found.tool_calls) == [("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]
    content, calls = stream(JsonToolParser(NAMES), JSON_ARRAY, seed)
    assert content == "" and as_pairs(calls) == as_pairs(found.tool_calls)
    single = ' {"name": "get_time", "arguments": {"tz": "UTC"}}'
    assert as_pairs(JsonToolParser(NAMES).extract(single).tool_calls) == [("get_time", '{"tz": "UTC"}')]
    for text in ('{"name": "unknown_fn", "arguments": {}}', '{"a": 1}', "plain text", "[1, 2]"):
        assert JsonToolParser(NAMES).extract(text).content == text
        content, calls = stream(JsonToolParser(NAMES), text, seed)
        assert content == text and calls == []


@pytest.mark.parametrize("seed", range(4))
def test_named_parser_streams_the_whole_output_as_arguments(seed: int) -> None:
    text = '{"city": "Rome", "unit": "f"}'
    found = NamedToolParser("get_weather").extract(text)
    assert as_pairs(found.tool_calls) == [("get_weather", text)] and found.content is None
    content, calls = stream(NamedToolParser("get_weather"), text, seed)
    assert content == "" and as_pairs(calls) == [("get_weather", text)]
    assert not NamedToolParser("get_weather").extract('{"city": "Ro').tool_calls  # cut short


def test_required_schema_accepts_calls_and_rejects_others() -> None:
    functions = {"get_weather": WEATHER["function"], "get_time": TIME["function"]}
    schema = required_schema(functions, parallel=True)
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}}], schema)
    jsonschema.validate(
        [{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {}}], schema
    )
    for bad in ([], [{"name": "nope", "arguments": {}}], [{"name": "get_weather", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = required_schema(functions, parallel=False)
    jsonschema.validate({"name": "get_time", "arguments": {}}, single)


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[], **fields)  # type: ignore[arg-type]


def test_plan_tools_modes() -> None:
    auto = ToolSettings(enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert plan_tools(chat(), ToolSettings()) is None
    assert plan_tools(chat(tools=[WEATHER], tool_choice="none"), ToolSettings()) is None
    plan = plan_tools(chat(tools=[WEATHER]), auto)
    assert plan is not None and plan.mode == "auto" and plan.structured is None
    plan = plan_tools(chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False), auto)
    assert plan is not None and plan.structured is not None and plan.structured.json_schema is not None
    assert json.loads(plan.structured.json_schema)["anyOf"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_tools(chat(tools=[WEATHER, TIME], tool_choice=named), ToolSettings())
    assert plan is not None and plan.named == "get_weather"
    assert plan.structured is not None
    # The tool's own schema, with its open string bounded (--max-tool-argument-chars, default 1000).
    bounded = json.loads(plan.structured.json_schema or "")
    assert bounded["properties"]["city"] == {"type": "string", "maxLength": 1000}
    assert bounded.pop("additionalProperties") is False  # undeclared keys closed too
    assert {**bounded, "properties": WEATHER["function"]["parameters"]["properties"]} == WEATHER["function"][
        "parameters"
    ]
    unbounded = plan_tools(
        chat(tools=[WEATHER], tool_choice=named), ToolSettings(max_tool_argument_chars=None)
    )
    assert unbounded is not None and unbounded.structured is not None
    assert json.loads(unbounded.structured.json_schema or "") == WEATHER["function"]["parameters"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"tools": [WEATHER]}, "--enable-auto-tool-choice"),  # auto is the default with tools
        ({"tool_choice": "required"}, "needs `tools`"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "not in"),
        ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "name"),
    ],
)
def test_plan_tools_errors_are_400(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(APIError) as info:
        plan_tools(chat(**fields), ToolSettings())
    assert info.value.status == 400 and needle in str(info.value.message)
