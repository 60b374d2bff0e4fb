"""Issue 7 acceptance, tool calling: forced calls (required, named) always name an existing function with
arguments that validate; streams rebuild to the same call; auto mode parses Hermes-style calls."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess

NUM_SAMPLES = 20
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"timezone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}},
]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def chat(server: ServerProcess, **fields: Any) -> httpx.Response:
    body = {"model": DEFAULT_MODEL_NAME, "messages": MESSAGES, "tools": TOOLS, "temperature": 1.0, **fields}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=600)


def check_calls(response: httpx.Response, *, only: str | None = None) -> list[dict[str, Any]]:
    """Every choice carries valid calls; returns all of them."""
    assert response.status_code == 200, response.text
    calls = []
    for choice in response.json()["choices"]:
        message = choice["message"]
        assert choice["finish_reason"] == "tool_calls" and message["content"] is None, choice
        assert message["tool_calls"], choice
        for call in message["tool_calls"]:
            assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
            name = call["function"]["name"]
            assert name in PARAMS and (only is None or name == only)
            jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[name])
            calls.append(call)
    return calls


def test_required_tool_choice_always_calls_a_tool(default_server: ServerProcess) -> None:
    # One call per choice (parallel_tool_calls false): the grammar bounds it well under max_tokens.
    response = chat(
        default_server, tool_choice="required", parallel_tool_calls=False, n=NUM_SAMPLES, max_tokens=100
    )
    assert len(response.json()["choices"]) == NUM_SAMPLES
    assert len(check_calls(response)) == NUM_SAMPLES


def test_required_parallel_calls_validate_even_when_cut_off(default_server: ServerProcess) -> None:
    # Parallel calls are an array with no upper bound: at temperature 1 a sample can keep adding calls
    # until max_tokens (vLLM alike). Every choice still names tools, every complete call validates, and a
    # choice cut off ("length") has only its last call partial.
    response = chat(default_server, tool_choice="required", n=NUM_SAMPLES, max_tokens=100)
    choices = response.json()["choices"]
    assert len(choices) == NUM_SAMPLES
    for choice in choices:
        message = choice["message"]
        assert choice["finish_reason"] in ("tool_calls", "length") and message["content"] is None, choice
        calls = message["tool_calls"]
        assert calls, choice
        complete = calls if choice["finish_reason"] == "tool_calls" else calls[:-1]
        for call in calls:
            assert call["function"]["name"] in PARAMS
        for call in complete:
            jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[call["function"]["name"]])


def test_named_tool_choice_always_calls_that_tool(default_server: ServerProcess) -> None:
    response = chat(default_server, tool_choice=NAMED, n=NUM_SAMPLES, max_tokens=60)
    assert len(response.json()["choices"]) == NUM_SAMPLES
    calls = check_calls(response, only="get_weather")
    assert len(calls) == NUM_SAMPLES  # exactly one call per choice


def stream_calls(server: ServerProcess, **fields: Any) -> tuple[list[dict[str, str]], str | None]:
    """Streams a request with the OpenAI SDK and rebuilds its tool calls from the deltas."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    num_argument_deltas = 0
    sdk_fields = {k: v for k, v in fields.items() if k in ("tool_choice", "temperature", "max_tokens")}
    extra = {k: v for k, v in fields.items() if k not in sdk_fields}  # vLLM extensions
    for chunk in client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=MESSAGES, tools=TOOLS, stream=True, extra_body=extra, **sdk_fields
    ):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            indexes = [delta.index for delta in choice.delta.tool_calls or []]
            assert len(indexes) == len(set(indexes)), chunk  # one entry per index per chunk, as OpenAI
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # the first delta of a call carries its id and name
                    assert delta.id and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and not delta.function.name
                    num_argument_deltas += 1
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert num_argument_deltas > 1  # arguments really arrive in fragments
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_streaming_rebuilds_the_same_call(default_server: ServerProcess, tool_choice: Any) -> None:
    fields = {"tool_choice": tool_choice, "temperature": 0, "max_tokens": 80}
    whole = check_calls(chat(default_server, **fields))
    streamed, finish = stream_calls(default_server, **fields)
    assert finish == "tool_calls"
    pairs = [(c["function"]["name"], c["function"]["arguments"]) for c in whole]
    assert [(c["name"], c["arguments"]) for c in streamed] == pairs


HERMES_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "celsius"\}\}</tool_call>'


def test_auto_parses_hermes_calls_and_passes_plain_text(default_server: ServerProcess) -> None:
    # The small model does not call tools by itself; a regex makes it write a Hermes-style call.
    fields = {"tool_choice": "auto", "max_tokens": 60, "guided_regex": HERMES_CALL}
    (call,) = check_calls(chat(default_server, **fields), only="get_weather")
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    streamed, finish = stream_calls(default_server, **fields, temperature=0)
    assert finish == "tool_calls" and [c["name"] for c in streamed] == ["get_weather"]
    plain = chat(default_server, max_tokens=8, temperature=0).json()["choices"][0]
    assert plain["message"]["content"] and not plain["message"]["tool_calls"]
    assert plain["finish_reason"] in ("stop", "length")


def test_multi_turn_with_tool_results_and_errors(default_server: ServerProcess) -> None:
    turn = {
        "role": "assistant",
        "content": "",  # SmolLM2's template concatenates content, so None would be a template error
        "tool_calls": [
            {
                "id": "chatcmpl-tool-1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": '{"temperature": 21}'}
    response = chat(default_server, messages=[*MESSAGES, turn, result], tool_choice="none", max_tokens=8)
    assert response.status_code == 200, response.text
    unknown = {"type": "function", "function": {"name": "nope"}}
    response = chat(default_server, tool_choice=unknown, max_tokens=8)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    response = chat(default_server, tool_choice="required", max_tokens=8, guided_regex="a+")
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"


# A tool whose parameters use $defs / $ref (pydantic writes schemas this way).
PLACE_PARAMS = {
    "type": "object",
    "properties": {"place": {"$ref": "#/$defs/Place"}},
    "required": ["place"],
    "additionalProperties": False,
    "$defs": {
        "Place": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"$ref": "#/$defs/Unit"}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "Unit": {"enum": ["celsius", "fahrenheit"]},
    },
}
PLACE_TOOL = {"type": "function", "function": {"name": "get_place_weather", "parameters": PLACE_PARAMS}}


def test_required_with_refs_in_the_tool_schema(default_server: ServerProcess) -> None:
    """Issue 16 item 13: was 400 "Pointer '/$defs/Place' does not exist"."""
    response = chat(default_server, tools=[PLACE_TOOL, *TOOLS], tool_choice="required", n=4, max_tokens=80)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        for call in choice["message"]["tool_calls"]:
            schema = PLACE_PARAMS if call["function"]["name"] == "get_place_weather" else None
            schema = schema or PARAMS[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


OPEN_STRING_TOOL = {
    "type": "function",
    "function": {
        "name": "write_note",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
}


@pytest.mark.parametrize(
    ("tool_choice", "max_tokens"),
    [("required", 20), ({"type": "function", "function": {"name": "write_note"}}, 6)],
    ids=["required", "named"],
)
def test_forced_call_cut_by_max_tokens_is_a_partial_call(
    default_server: ServerProcess, tool_choice: Any, max_tokens: int
) -> None:
    """Issue 16 item 15: the partial call comes back as tool_calls, content null, finish_reason length;
    a stream sends the same argument text and ends with "length" too. `max_tokens` stops each mode
    inside the open string argument (the required form spends ~15 tokens on the name first)."""
    fields = {
        "tools": [OPEN_STRING_TOOL],
        "tool_choice": tool_choice,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    response = chat(default_server, **fields)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    message = choice["message"]
    assert choice["finish_reason"] == "length" and message["content"] is None, choice
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "write_note" and call["id"].startswith("chatcmpl-tool-")
    arguments = call["function"]["arguments"]
    assert arguments.replace(" ", "").startswith('{"text":"'), arguments
    with pytest.raises(ValueError):
        json.loads(arguments)  # really cut off
    body = {"model": DEFAULT_MODEL_NAME, "messages": MESSAGES, **fields, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{default_server.base_url}/v1/chat/completions", json=body, timeout=600) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
    streamed = "".join(
        tc["function"].get("arguments") or "" for c in choices for tc in c["delta"].get("tool_calls") or []
    )
    assert streamed == arguments
