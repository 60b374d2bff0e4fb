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
    if "token_ids" in body and body.get("sampling_params") is None:
        # /inference/v1/generate without sampling_params generates to the end of the context too (a
        # schemathesis case `{"token_ids": [0]}` ran past the 120 s request timeout).
        body["sampling_params"] = {}
    params = body.get("sampling_params")
    if "token_ids" in body and isinstance(params, dict) and params.get("max_tokens") is None:
        params["max_tokens"] = 2


def warm_api_rss_mib(server: ServerProcess) -> float:
    """The API process's RSS once it has loaded what it loads lazily for good: decoding `prompt_embeds`
    imports torch (~200 MiB, once per process; measured +186 MiB in the middle of a 400-example fuzz run),
    which is not what the memory check is after."""
    resp = httpx.post(
        f"{server.base_url}/v1/completions", json={"prompt_embeds": "eHh4eA==", "max_tokens": 1}, timeout=120
    )
    assert resp.status_code == 400, resp.text  # four bytes are no tensor; torch is loaded by now
    return api_rss_mib(server)


def api_rss_mib(server: ServerProcess) -> float:
    """Resident memory of the server's API process (the launcher's `tandem api` child), in MiB."""
    import psutil

    for child in psutil.Process(server.proc.pid).children():
        if "api" in child.cmdline()[3:4]:  # [python, -m, tandem, api, ...]
            return child.memory_info().rss / 2**20
    raise AssertionError("no API process under the launcher")


# The API process must come back near its starting memory after a fuzz run (issue 13 saw 94 MB -> 5.3 GB,
# held by caches keyed by whole multi-MB bodies). Measured growth is ~10 MiB after 25 examples per route
# and ~X MiB after 400 (docs/reliability.md); 256 MiB leaves room for allocator arenas and the
# tokenizer's caches while still catching any cache that keeps bodies. The baseline is taken after the
# lazy torch import (warm_api_rss_mib).
MAX_FUZZ_RSS_GROWTH_MIB = 256.0


def check_rss_after_fuzz(server: ServerProcess, rss_before: float, what: str) -> None:
    rss_after = api_rss_mib(server)
    print(f"API process RSS: {rss_before:.1f} MiB before the {what}, {rss_after:.1f} MiB after")
    assert rss_after - rss_before <= MAX_FUZZ_RSS_GROWTH_MIB, (
        f"API RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )
