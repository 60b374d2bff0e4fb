"""Issue 4 acceptance: the error model over real HTTP — statuses, OpenAI bodies, request ids, limits."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from frontend.app import build_app
from frontend.config import FrontendConfig
from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess, serve

HI = [{"role": "user", "content": "hi"}]
LONG_TEXT = "word " * 9000  # longer than the default model's context


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL_NAME, "messages": HI, "max_tokens": 2, **fields}


def completion_body(**fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL_NAME, "prompt": "hi", "max_tokens": 2, **fields}


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
INVALID = "invalid_request_error"

# (route, body, status, type, param)
BAD_INPUTS: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    (CHAT, chat_body(temperature=-0.1), 400, INVALID, "temperature"),
    (CHAT, chat_body(temperature=2.5), 400, INVALID, "temperature"),
    (CHAT, chat_body(top_p=0), 400, INVALID, "top_p"),
    (CHAT, chat_body(top_p=1.5), 400, INVALID, "top_p"),
    (CHAT, chat_body(top_k=-2), 400, INVALID, "top_k"),
    (CHAT, chat_body(min_p=1.5), 400, INVALID, "min_p"),
    (CHAT, chat_body(presence_penalty=2.5), 400, INVALID, "presence_penalty"),
    (CHAT, chat_body(frequency_penalty=-2.5), 400, INVALID, "frequency_penalty"),
    (CHAT, chat_body(repetition_penalty=0), 400, INVALID, "repetition_penalty"),
    (CHAT, chat_body(n=0), 400, INVALID, "n"),
    (CHAT, chat_body(n=1000), 400, INVALID, "n"),
    (CHAT, chat_body(max_tokens=0), 400, INVALID, "max_tokens"),
    (CHAT, chat_body(max_completion_tokens=0), 400, INVALID, "max_completion_tokens"),
    (CHAT, chat_body(max_tokens=100_000), 400, INVALID, "max_tokens"),
    (CHAT, chat_body(logprobs=True, top_logprobs=21), 400, INVALID, "top_logprobs"),
    (CHAT, chat_body(top_logprobs=2), 400, INVALID, "top_logprobs"),
    (CHAT, chat_body(prompt_logprobs=21), 400, INVALID, "prompt_logprobs"),
    (CHAT, chat_body(logit_bias={"abc": 1}), 400, INVALID, "logit_bias"),
    (CHAT, chat_body(logit_bias={"5": 101}), 400, INVALID, "logit_bias"),
    (CHAT, chat_body(logit_bias={"10000000": 1}), 400, INVALID, "logit_bias"),
    (CHAT, chat_body(logit_bias={" 1": 1}), 400, INVALID, "logit_bias"),
    (CHAT, chat_body(logit_bias={"1_0": 1}), 400, INVALID, "logit_bias"),
    (CHAT, chat_body(logit_bias={"\u0661": 1}), 400, INVALID, "logit_bias"),  # ARABIC-INDIC DIGIT ONE
    (CHAT, chat_body(logit_bias={"1" * 40: 1}), 400, INVALID, "logit_bias"),
    # Integers past 64 bits: once a 503 that left a routing entry behind (issue 13, defect 7).
    (CHAT, chat_body(priority=2**64), 400, INVALID, "priority"),
    (CHAT, chat_body(top_k=2**64), 400, INVALID, "top_k"),
    (CHAT, chat_body(seed=2**64), 400, INVALID, "seed"),
    (CHAT, chat_body(seed=-(2**70)), 400, INVALID, "seed"),
    (CHAT, chat_body(max_tokens=2**64), 400, INVALID, "max_tokens"),
    (CHAT, chat_body(min_tokens=2**64), 400, INVALID, "min_tokens"),
    (CHAT, chat_body(n=2**64), 400, INVALID, "n"),
    (CHAT, chat_body(stop_token_ids=[1, 2**64]), 400, INVALID, "stop_token_ids[1]"),
    (CHAT, chat_body(allowed_token_ids=[2**64]), 400, INVALID, "allowed_token_ids[0]"),
    (COMPLETIONS, completion_body(prompt=[1, 2**64]), 400, INVALID, "prompt[1]"),
    (COMPLETIONS, completion_body(priority=-(2**64)), 400, INVALID, "priority"),
    # The engine's own refusal (no token satisfies both constraints) is the client's: 400, not server_error.
    (CHAT, chat_body(allowed_token_ids=[0], guided_regex="[0-9]+"), 400, INVALID, None),
    (CHAT, chat_body(stop=""), 400, INVALID, "stop"),
    (CHAT, chat_body(stop_token_ids=[-1]), 400, INVALID, "stop_token_ids"),
    (CHAT, chat_body(stop_token_ids=[10_000_000]), 400, INVALID, "stop_token_ids"),
    (CHAT, chat_body(min_tokens=5), 400, INVALID, "min_tokens"),
    (CHAT, chat_body(seed="abc"), 400, INVALID, "seed"),
    (CHAT, chat_body(stream_options={"include_usage": True}), 400, INVALID, "stream_options"),
    (CHAT, chat_body(messages=[]), 400, INVALID, "messages"),
    (CHAT, chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, INVALID, "messages[0].role"),
    (CHAT, chat_body(messages=[{"role": "user", "content": LONG_TEXT}]), 400, INVALID, "messages"),
    (CHAT, chat_body(response_format={"type": "xml"}), 400, INVALID, "response_format.type"),
    (CHAT, chat_body(use_beam_search=True), 400, INVALID, "use_beam_search"),
    (CHAT, chat_body(model="no-such-model"), 404, INVALID, "model"),
    (COMPLETIONS, completion_body(prompt=[]), 400, INVALID, "prompt"),
    (COMPLETIONS, completion_body(prompt=[[1, 2], []]), 400, INVALID, "prompt[1]"),
    (COMPLETIONS, completion_body(prompt=[1, "a"]), 400, INVALID, "prompt"),
    (COMPLETIONS, completion_body(prompt=[10_000_000]), 400, INVALID, "prompt"),
    (COMPLETIONS, completion_body(prompt=LONG_TEXT), 400, INVALID, "prompt"),
    (COMPLETIONS, completion_body(logprobs=21), 400, INVALID, "logprobs"),
    (COMPLETIONS, completion_body(best_of=3), 400, INVALID, "best_of"),
    (COMPLETIONS, completion_body(suffix="x"), 400, INVALID, "suffix"),
    (COMPLETIONS, {"model": DEFAULT_MODEL_NAME}, 400, INVALID, "prompt"),
    (COMPLETIONS, completion_body(model="no-such-model"), 404, INVALID, "model"),
]


@pytest.mark.parametrize(("route", "body", "status", "type_", "param"), BAD_INPUTS)
def test_bad_inputs_get_their_status_type_and_param(
    default_server: ServerProcess,
    route: str,
    body: dict[str, Any],
    status: int,
    type_: str,
    param: str | None,
) -> None:
    resp = httpx.post(default_server.base_url + route, json=body, timeout=60)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == (type_, param)
    assert error["message"]
    assert resp.headers["x-request-id"]


def test_unknown_model_has_openai_code_and_unknown_route_is_404(default_server: ServerProcess) -> None:
    resp = httpx.post(default_server.base_url + CHAT, json=chat_body(model="gpt-x"), timeout=60)
    assert resp.json()["error"]["code"] == "model_not_found"
    missing = httpx.post(default_server.base_url + "/v1/no/such/route", json={}, timeout=60)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == INVALID
    assert missing.headers["x-request-id"]


def test_every_response_carries_the_clients_request_id(default_server: ServerProcess) -> None:
    url = default_server.base_url
    for method, path, body in [
        ("POST", CHAT, chat_body()),
        ("POST", CHAT, chat_body(temperature=-1)),
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
        ("GET", "/nowhere", None),
    ]:
        resp = httpx.request(
            method, url + path, json=body, headers={"X-Request-Id": "client-id-42"}, timeout=60
        )
        assert resp.headers["x-request-id"] == "client-id-42", (path, resp.status_code)
    with httpx.stream(
        "POST", url + CHAT, json=chat_body(stream=True), headers={"X-Request-Id": "stream-7"}, timeout=60
    ) as resp:
        assert resp.headers["x-request-id"] == "stream-7"
        resp.read()
    fresh = {httpx.get(url + "/v1/models", timeout=60).headers["x-request-id"] for _ in range(2)}
    assert len(fresh) == 2  # a new id per request when the client sends none


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[ServerProcess]:
    """API key from TANDEM_API_KEY, a 4 KiB body limit, and a waiting queue of 0 (every request is refused)."""
    server = serve(
        ["--max-request-body-bytes", "4096", "--max-waiting-requests", "0"], env={"TANDEM_API_KEY": "s3cret"}
    )
    yield server
    server.stop()


def test_api_key_limits_and_overload(guarded_server: ServerProcess) -> None:
    url = guarded_server.base_url + CHAT
    good = {"Authorization": "Bearer s3cret"}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]:
        resp = httpx.post(url, json=chat_body(), headers=headers, timeout=60)
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
        assert resp.headers["x-request-id"]
    assert httpx.get(guarded_server.base_url + "/health", timeout=60).status_code == 200  # not guarded
    assert httpx.get(guarded_server.base_url + "/v1/models", headers=good, timeout=60).status_code == 200
    big = httpx.post(
        url, json=chat_body(messages=[{"role": "user", "content": "x" * 5000}]), headers=good, timeout=60
    )
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "request_too_large"
    busy = httpx.post(url, json=chat_body(), headers=good, timeout=60)
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["type"] == "server_error"
    streamed = httpx.post(url, json=chat_body(stream=True), headers=good, timeout=60)
    assert streamed.status_code == 503  # refused before the stream starts: a real status, not an SSE error


def test_a_500_hides_the_traceback_and_logs_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    """In-process: a handler that crashes (no engine needed, so no lifespan is run)."""

    async def crash(_request: Request) -> None:
        raise RuntimeError("secret internal detail")

    app = build_app(FrontendConfig(engine_addresses=("ipc:///nonexistent",)))
    app.router.routes.append(Route("/crash", crash))
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="tandem.api"):
        resp = client.get("/crash", headers={"X-Request-Id": "req-500-abc"})
    assert resp.status_code == 500
    assert resp.headers["x-request-id"] == "req-500-abc"
    body = resp.json()
    assert body["error"]["type"] == "server_error"
    assert "secret" not in resp.text and "Traceback" not in resp.text
    assert "req-500-abc" in body["error"]["message"]
    assert any("req-500-abc" in r.getMessage() for r in caplog.records)


def _load(base_url: str) -> tuple[int, int]:
    """(server_load, outstanding requests summed over engines) from /load."""
    load = httpx.get(base_url + "/load", timeout=60).json()
    return load["server_load"], sum(engine["outstanding"] for engine in load["engines"])


def test_load_counts_requests_in_flight_and_returns_to_zero(default_server: ServerProcess) -> None:
    url = default_server.base_url
    for body in (chat_body(priority=2**64), chat_body(top_k=2**64), chat_body(seed=2**64)):
        assert httpx.post(url + CHAT, json=body, timeout=60).status_code == 400
    assert _load(url) == (0, 0)  # refused requests leave no routing entry behind
    body = chat_body(stream=True, max_tokens=500, ignore_eos=True)
    with httpx.stream("POST", url + CHAT, json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert _load(url) == (1, 1)
    # The client went away mid-stream: the handler is cancelled and the engine request aborted.
    deadline = time.monotonic() + 20
    while _load(url) != (0, 0):
        assert time.monotonic() < deadline, _load(url)
        time.sleep(0.1)


def test_a_client_that_never_reads_its_stream_stalls_no_one(default_server: ServerProcess) -> None:
    url = default_server.base_url
    body = json.dumps(chat_body(stream=True, max_tokens=400, ignore_eos=True)).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after a few chunks
        slow.connect(("127.0.0.1", default_server.port))
        slow.sendall(head + body)  # ...and is never read
        deadline = time.monotonic() + 60
        while _load(url) != (1, 1):
            assert time.monotonic() < deadline, _load(url)
            time.sleep(0.1)
        for _ in range(3):  # meanwhile others are served as usual
            resp = httpx.post(url + CHAT, json=chat_body(max_tokens=8), timeout=120)
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] <= 8
        assert _load(url)[0] == 1
    deadline = time.monotonic() + 30
    while _load(url) != (0, 0):  # the reader is gone: its request is aborted
        assert time.monotonic() < deadline, _load(url)
        time.sleep(0.1)
