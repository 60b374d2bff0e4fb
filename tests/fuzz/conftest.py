"""Shared pieces of the fuzzers: how long to run, what an error body must look like, the greedy check."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess

# `make test` runs a short fuzz (well under 90 s); `make stress` sets TANDEM_FUZZ_EXAMPLES much higher.
FUZZ_EXAMPLES = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "4"))

GREEDY_CHAT = {
    "model": DEFAULT_MODEL_NAME,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 4,
    "temperature": 0,
}


def greedy_answer(server: ServerProcess) -> str:
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=GREEDY_CHAT, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def check_response(status: int, text: str, what: str) -> None:
    """No 5xx ever; every rejection is an OpenAI error body."""
    assert status < 500, f"{status} for {what}: {text[:500]}"
    if status >= 400:
        body: Any = json.loads(text)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, text
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def bound_generation(body: Any) -> None:
    """A body that would generate with no `max_tokens` (absent or null) gets `max_tokens: 2`: chat and
    generate then run to the end of the context, minutes on this CPU, which is valid and not what the
    fuzzers test. Hostile values of the field itself are left as they are."""
    if not isinstance(body, dict):
        return
    if ("messages" in body or "prompt" in body) and body.get("max_tokens") is None:
        body["max_tokens"] = 2
    params = body.get("sampling_params")
    if "token_ids" in body and isinstance(params, dict) and params.get("max_tokens") is None:
        params["max_tokens"] = 2
