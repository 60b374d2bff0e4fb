"""`tandem serve --speculative-config`: the flag reaches the engine process, the streamed greedy answer
equals the shared default server's (same model, same dtype), and the acceptance counters show drafts."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL_NAME
from tests.e2e.test_scale_out import metric_samples
from tests.server_process import ServerProcess, serve

SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
TEXT = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
BODY = {
    "model": DEFAULT_MODEL_NAME,
    "messages": [{"role": "user", "content": f"Rename add to plus and repeat the code:\n{TEXT}"}],
    "temperature": 0,
    "max_tokens": 40,
}


@pytest.fixture(scope="module")
def spec_server() -> Iterator[ServerProcess]:
    server = serve(["--dtype", "float32", "--speculative-config", SPEC])
    yield server
    server.stop()


def _streamed(base_url: str) -> tuple[str, int]:
    """The streamed answer's text and the number of chunks that carried text."""
    text, chunks = "", 0
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json={**BODY, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                text += choices[0]["delta"]["content"]
                chunks += 1
    return text, chunks


def test_greedy_chat_is_the_same_with_speculation(
    default_server: ServerProcess, spec_server: ServerProcess
) -> None:
    plain = httpx.post(f"{default_server.base_url}/v1/chat/completions", json=BODY, timeout=120)
    fast = httpx.post(f"{spec_server.base_url}/v1/chat/completions", json=BODY, timeout=120)
    assert plain.status_code == fast.status_code == 200, fast.text
    answer = plain.json()["choices"][0]["message"]["content"]
    assert fast.json()["choices"][0]["message"]["content"] == answer
    # Token counts, not cached_tokens: the shared default server may hold this prompt's prefix from
    # earlier tests.
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [fast.json()["usage"][k] for k in counts] == [plain.json()["usage"][k] for k in counts]
    # Streamed: several tokens per step arrive as one chunk and add up to the same text.
    text, chunks = _streamed(spec_server.base_url)
    assert text == answer
    assert chunks < fast.json()["usage"]["completion_tokens"]
    metrics = httpx.get(f"{spec_server.base_url}/metrics", timeout=10).text
    drafts = sum(metric_samples(metrics, "vllm:spec_decode_num_draft_tokens_total").values())
    accepted = sum(metric_samples(metrics, "vllm:spec_decode_num_accepted_tokens_total").values())
    assert drafts >= accepted > 0
