"""Issue 2 acceptance: the default model served end to end over real HTTP, ZeroMQ and processes."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess

PARIS_REQUEST = {
    "model": DEFAULT_MODEL_NAME,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "temperature": 0,
    "max_tokens": 32,
}


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_openai_sdk_chat_answers_paris(default_server: ServerProcess) -> None:
    resp = _client(default_server).chat.completions.create(**PARIS_REQUEST)
    text = resp.choices[0].message.content
    assert "Paris" in text
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_yields_the_same_text_chunk_by_chunk(default_server: ServerProcess) -> None:
    client = _client(default_server)
    full = client.chat.completions.create(**PARIS_REQUEST).choices[0].message.content
    pieces = []
    finish = None
    for chunk in client.chat.completions.create(**PARIS_REQUEST, stream=True):
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # really streamed, not one blob
    assert "".join(pieces) == full
    assert finish in ("stop", "length")


def test_completions_endpoint(default_server: ServerProcess) -> None:
    resp = _client(default_server).completions.create(
        model=DEFAULT_MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in resp.choices[0].text
    assert resp.usage.completion_tokens == 8


def test_models_and_health(default_server: ServerProcess) -> None:
    models = _client(default_server).models.list()
    assert [m.id for m in models.data] == [DEFAULT_MODEL_NAME]
    assert httpx.get(f"{default_server.base_url}/health").status_code == 200


async def _stream_one(client: httpx.AsyncClient, url: str, i: int) -> tuple[str, str | None]:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": f"Count from {i} to {i + 10}."}],
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
    }
    text, finish = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_sixteen_concurrent_streams_share_engine_steps(default_server: ServerProcess) -> None:
    url = default_server.base_url

    async def run_all() -> list[tuple[str, str | None]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[_stream_one(client, url, i) for i in range(16)])

    results = asyncio.run(run_all())
    assert len(results) == 16
    for text, finish in results:
        assert text.strip()
        assert finish in ("stop", "length")

    # The same requests one at a time must give the same greedy text: batching changes nothing.
    async def one(i: int) -> tuple[str, str | None]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await _stream_one(client, url, i)

    assert asyncio.run(one(3)) == results[3]
    metrics = httpx.get(f"{url}/metrics").text
    match = re.search(r"^tandem:max_step_num_seqs\{[^}]*\} ([0-9.]+)$", metrics, re.MULTILINE)
    assert match, metrics
    assert float(match.group(1)) >= 16  # all 16 ran in one engine step at least once


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b'{"model": "SmolLM2-135M-Instruct"}', 400, "messages"),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 400, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    default_server: ServerProcess, body: bytes, status: int, param: str | None
) -> None:
    resp = httpx.post(
        f"{default_server.base_url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    assert "x-request-id" in resp.headers
    ok = _client(default_server).chat.completions.create(**{**PARIS_REQUEST, "max_tokens": 4})
    assert ok.choices[0].message.content
