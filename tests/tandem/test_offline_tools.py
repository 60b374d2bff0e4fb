"""Tool calling in the offline `LLM.chat`: the server's tool_choice modes, forced calls that validate,
Hermes parsing in auto mode, the same calls as the server at temperature 0, and clear errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest

from tandem import LLM, CompletionOutput, SamplingParams
from tests.e2e.test_tool_calling import HERMES_CALL, NAMED, PARAMS, TOOLS

PROMPTS = [
    "What is the weather in Paris?",
    "Is it cold in Oslo today? Answer in fahrenheit.",
    "What time is it in California?",
    "Tell me the weather and the time in Rome.",
]
CONVERSATIONS = [[{"role": "user", "content": p}] for p in PROMPTS]


@pytest.fixture(scope="module")
def hermes_llm() -> LLM:
    """The default model with the Hermes parser, as `--enable-auto-tool-choice --tool-call-parser hermes`."""
    return LLM(kv_cache_memory="256M", dtype="float32", tool_call_parser="hermes")


def check_calls(out: CompletionOutput, *, only: str | None = None) -> None:
    assert out.finish_reason == "tool_calls" and out.content is None, out
    assert out.tool_calls, out
    for call in out.tool_calls:
        assert call.id.startswith("chatcmpl-tool-")
        assert call.name in PARAMS and (only is None or call.name == only)
        jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])


def test_required_always_calls_a_listed_tool(hermes_llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=60)
    results = hermes_llm.chat(CONVERSATIONS, greedy, use_tqdm=False, tools=TOOLS, tool_choice="required")
    assert len(results) == len(PROMPTS)
    for result in results:
        check_calls(result.outputs[0])
    # Sampled: one call each (with parallel calls allowed, temperature 1 can chain calls up to max_tokens).
    sampled = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=60)
    for result in hermes_llm.chat(
        CONVERSATIONS, sampled, use_tqdm=False, tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    ):
        assert len(result.outputs) == 2
        for out in result.outputs:
            check_calls(out)
            assert len(out.tool_calls) == 1


def test_named_always_calls_that_tool_once(hermes_llm: LLM) -> None:
    params = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=60)
    for result in hermes_llm.chat(CONVERSATIONS, params, use_tqdm=False, tools=TOOLS, tool_choice=NAMED):
        for out in result.outputs:
            check_calls(out, only="get_weather")
            assert len(out.tool_calls) == 1 and out.tool_calls[0].arguments == out.text


def test_none_and_no_parser_give_plain_text(hermes_llm: LLM, offline_llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8)
    with_none = hermes_llm.chat(CONVERSATIONS, params, use_tqdm=False, tools=TOOLS, tool_choice="none")
    # Without a parser, tools alone only go to the template, as in vLLM's offline chat.
    no_parser = offline_llm.chat(CONVERSATIONS, params, use_tqdm=False, tools=TOOLS)
    for a, b in zip(with_none, no_parser, strict=True):
        for out in (a.outputs[0], b.outputs[0]):
            assert out.tool_calls == [] and out.content == out.text and out.text
            assert out.finish_reason in ("stop", "length")
        assert a.outputs[0].text == b.outputs[0].text and a.prompt == b.prompt


def test_auto_parses_the_models_hermes_output(hermes_llm: LLM) -> None:
    # The small model does not call tools by itself; a regex makes it write a Hermes-style call.
    params = SamplingParams(temperature=0.0, max_tokens=60, regex=HERMES_CALL)
    for result in hermes_llm.chat(
        CONVERSATIONS[:2], params, use_tqdm=False, tools=TOOLS
    ):  # auto: the default
        out = result.outputs[0]
        assert out.text.startswith("<tool_call>")  # the raw model output stays in `text`
        check_calls(out, only="get_weather")
        assert json.loads(out.tool_calls[0].arguments)["city"] in ("Paris", "Rome")
    plain = hermes_llm.chat(
        CONVERSATIONS[0], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False, tools=TOOLS
    )[0].outputs[0]
    assert plain.tool_calls == [] and plain.content == plain.text


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_same_calls_as_the_server(default_server, hermes_llm: LLM, tool_choice: Any) -> None:
    body = {"messages": CONVERSATIONS[0], "tools": TOOLS, "tool_choice": tool_choice}
    body |= {"temperature": 0, "max_tokens": 80}
    response = httpx.post(f"{default_server.base_url}/v1/chat/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    out = hermes_llm.chat(
        CONVERSATIONS[0],
        SamplingParams(temperature=0.0, max_tokens=80),
        use_tqdm=False,
        tools=TOOLS,
        tool_choice=tool_choice,
    )[0].outputs[0]
    assert (out.content, out.finish_reason) == (choice["message"]["content"], choice["finish_reason"])
    server_calls = choice["message"]["tool_calls"]
    assert [c.to_dict()["function"] for c in out.tool_calls] == [c["function"] for c in server_calls]


def test_auto_without_a_parser_is_a_clear_error(offline_llm: LLM) -> None:
    with pytest.raises(ValueError, match='"auto" needs a tool-call parser.*tool_call_parser='):
        offline_llm.chat(CONVERSATIONS[0], tools=TOOLS, tool_choice="auto", use_tqdm=False)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in `tools`"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "needs `tools`"),
        ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "name"),
        # No schema checks these offline: the shared planner does.
        ({"tools": ["get_weather"], "tool_choice": "required"}, "`tools[0]` must be a tool object"),
        ({"tools": {"type": "function"}, "tool_choice": "required"}, "must be a list"),
        ({"tool_choice": ["required"]}, "must be a string or an object"),
    ],
)
def test_bad_tool_settings_raise_value_error(offline_llm: LLM, fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match="tool") as info:
        offline_llm.chat(CONVERSATIONS[0], use_tqdm=False, **{"tools": TOOLS, **fields})
    assert needle in str(info.value)


def test_forced_call_with_another_constraint_is_refused_before_running(offline_llm: LLM) -> None:
    steps = offline_llm.stepper.step_count
    with pytest.raises(ValueError, match="cannot be combined"):
        offline_llm.chat(
            CONVERSATIONS[0], SamplingParams(regex="a+"), use_tqdm=False, tools=TOOLS, tool_choice="required"
        )
    assert offline_llm.stepper.step_count == steps and not offline_llm.stepper.has_work


def test_unknown_parser_is_refused_before_loading() -> None:
    with pytest.raises(ValueError, match="unknown tool_call_parser 'mistral'; known: hermes, json"):
        LLM(tool_call_parser="mistral")
