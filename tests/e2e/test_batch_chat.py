"""POST /v1/chat/completions/batch: conversations answered in order, like separate requests, in one go."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.server_process import ServerProcess

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a fruit."}],
    [{"role": "user", "content": [{"type": "text", "text": "Count from one to five."}]}],
]
GREEDY = {"max_tokens": 12, "temperature": 0}


def _post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=300)


def test_batch_answers_each_conversation_as_a_single_request_would(default_server: ServerProcess) -> None:
    batch = _post(default_server, "/v1/chat/completions/batch", {"messages": CONVERSATIONS, **GREEDY})
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    singles = [
        _post(default_server, "/v1/chat/completions", {"messages": conv, **GREEDY}).json()
        for conv in CONVERSATIONS
    ]
    for choice, single in zip(body["choices"], singles, strict=True):
        assert choice["message"]["content"] == single["choices"][0]["message"]["content"]
        assert choice["finish_reason"] == single["choices"][0]["finish_reason"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert body["usage"][key] == sum(s["usage"][key] for s in singles)
    # Distinct conversations give distinct answers, so the order check above is not vacuous.
    assert len({c["message"]["content"] for c in body["choices"]}) == 3


def test_json_schema_applies_to_every_conversation(default_server: ServerProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 20}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    body = _post(
        default_server,
        "/v1/chat/completions/batch",
        {"messages": CONVERSATIONS, "max_tokens": 40, "temperature": 0, "response_format": response_format},
    ).json()
    assert len(body["choices"]) == 3
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 2}, "n"), ({"use_beam_search": True}, "use_beam_search"), ({"stream": True}, "stream")],
)
def test_unsupported_options_are_400(default_server: ServerProcess, extra: dict, param: str) -> None:
    response = _post(default_server, "/v1/chat/completions/batch", {"messages": CONVERSATIONS, **extra})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_bad_conversations_are_400_naming_them(default_server: ServerProcess) -> None:
    empty = _post(default_server, "/v1/chat/completions/batch", {"messages": []})
    bad_role = _post(
        default_server,
        "/v1/chat/completions/batch",
        {"messages": [CONVERSATIONS[0], [{"role": "robot", "content": "x"}]]},
    )
    flat = _post(default_server, "/v1/chat/completions/batch", {"messages": CONVERSATIONS[0]})
    assert [r.status_code for r in (empty, bad_role, flat)] == [400, 400, 400]
    assert bad_role.json()["error"]["param"] == "messages[1][0].role"
