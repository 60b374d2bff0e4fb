"""Tool calling on POST /v1/chat/completions/batch: every conversation gets the single chat's tools and
tool_choice handling, and bad tool specs are the same 400s."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.test_tool_calling import HERMES_CALL, NAMED, TOOLS, check_calls
from tests.server_process import ServerProcess

CONVERSATIONS = [
    [{"role": "user", "content": "What is the weather in Paris?"}],
    [{"role": "system", "content": "You tell the time."}, {"role": "user", "content": "Time in Berlin?"}],
]


def _post(server: ServerProcess, path: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"tools": TOOLS, **fields}, timeout=600)


def batch(server: ServerProcess, **fields: Any) -> httpx.Response:
    return _post(server, "/v1/chat/completions/batch", messages=CONVERSATIONS, **fields)


def check_choices(response: httpx.Response, *, only: str | None = None) -> list[dict[str, Any]]:
    """One choice per conversation, each with valid calls and finish_reason tool_calls; returns them."""
    check_calls(response, only=only)
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == list(range(len(CONVERSATIONS)))
    return choices


@pytest.mark.parametrize("seed", [1, 2])
def test_required_gives_every_conversation_valid_calls(default_server: ServerProcess, seed: int) -> None:
    # One call each: parallel calls are an unbounded array that a temperature-1 sample may cut off at
    # max_tokens on another CPU's logits (tests/e2e/test_tool_calling.py covers that case).
    fields = {"tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 100}
    check_choices(batch(default_server, **fields, temperature=1.0, seed=seed))


def test_named_and_auto_per_conversation(default_server: ServerProcess) -> None:
    named = check_choices(batch(default_server, tool_choice=NAMED, max_tokens=60, temperature=1.0))
    assert all(len(c["message"]["tool_calls"]) == 1 for c in named)
    # The small model does not call tools by itself; a regex makes it write a Hermes-style call.
    auto = batch(default_server, tool_choice="auto", max_tokens=60, temperature=0, guided_regex=HERMES_CALL)
    check_choices(auto, only="get_weather")
    plain = batch(default_server, tool_choice="none", max_tokens=8, temperature=0).json()["choices"]
    assert all(c["message"]["content"] and c["message"]["tool_calls"] == [] for c in plain)


def test_batch_calls_equal_single_chat_calls(default_server: ServerProcess) -> None:
    fields = {"tool_choice": "required", "max_tokens": 80, "temperature": 0}
    choices = check_choices(batch(default_server, **fields))
    for choice, messages in zip(choices, CONVERSATIONS, strict=True):
        single = _post(default_server, "/v1/chat/completions", messages=messages, **fields)
        assert single.status_code == 200, single.text
        expected = single.json()["choices"][0]["message"]["tool_calls"]
        got = choice["message"]["tool_calls"]
        assert [c["function"] for c in got] == [c["function"] for c in expected]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {}}], "tool_choice": "required"},
            "tools[0].function.name",
        ),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0].type"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required", "guided_regex": "a+"}, "tool_choice"),
    ],
    ids=["no-name", "bad-type", "unknown-named", "bad-choice", "with-constraint"],
)
def test_bad_tool_specs_are_400_like_single_chat(
    default_server: ServerProcess, fields: dict[str, Any], param: str
) -> None:
    response = batch(default_server, max_tokens=8, **fields)
    single = _post(default_server, "/v1/chat/completions", messages=CONVERSATIONS[0], max_tokens=8, **fields)
    for r in (response, single):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
    assert response.json()["error"]["message"] == single.json()["error"]["message"]
