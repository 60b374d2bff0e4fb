"""Prompt options of chat and completions: vLLM's `truncate_prompt_tokens`, and request chat templates."""

from __future__ import annotations

import httpx

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess

LONG_PROMPT = "Once upon a time there was a lighthouse keeper who loved the sea. The capital of France is"


def _post(server: ServerProcess, path: str, body: dict) -> dict:
    resp = httpx.post(f"{server.base_url}{path}", json={"model": DEFAULT_MODEL_NAME, **body}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_completions_keep_the_last_k_tokens(default_server: ServerProcess) -> None:
    full_ids = _post(default_server, "/tokenize", {"prompt": LONG_PROMPT})["tokens"]
    assert len(full_ids) > 8
    cut = _post(
        default_server,
        "/v1/completions",
        {"prompt": LONG_PROMPT, "max_tokens": 6, "temperature": 0, "truncate_prompt_tokens": 8},
    )
    by_ids = _post(
        default_server, "/v1/completions", {"prompt": full_ids[-8:], "max_tokens": 6, "temperature": 0}
    )
    assert cut["usage"]["prompt_tokens"] == 8
    assert cut["choices"][0]["text"] == by_ids["choices"][0]["text"]
    untouched = _post(
        default_server,
        "/v1/completions",
        {"prompt": LONG_PROMPT, "max_tokens": 1, "truncate_prompt_tokens": -1},
    )
    assert untouched["usage"]["prompt_tokens"] == len(full_ids)


def test_chat_prompt_is_cut_from_the_left(default_server: ServerProcess) -> None:
    messages = [{"role": "user", "content": LONG_PROMPT}]
    full = _post(default_server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    cut = _post(
        default_server,
        "/v1/chat/completions",
        {"messages": messages, "max_tokens": 1, "truncate_prompt_tokens": 10},
    )
    assert full["usage"]["prompt_tokens"] > 10
    assert cut["usage"]["prompt_tokens"] == 10


def test_a_request_chat_template_is_refused(default_server: ServerProcess) -> None:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template": "{{ messages[0]['content'] }}",
    }
    resp = httpx.post(f"{default_server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "chat_template"
