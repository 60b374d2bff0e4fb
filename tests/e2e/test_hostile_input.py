"""Issue 13 regressions at the API edge, against the shared real server: bodies nested past the depth
bound, bodies that are not JSON, reserved chat_template_kwargs. Each is a 400 with an OpenAI error body,
and the server keeps answering greedy requests exactly as before."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from frontend.request_body import MAX_JSON_DEPTH
from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess

HI = [{"role": "user", "content": "hi"}]
GREEDY_CHAT = {"model": DEFAULT_MODEL_NAME, "messages": HI, "max_tokens": 4, "temperature": 0}
POST_ROUTES = {
    "/v1/chat/completions": GREEDY_CHAT,
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions/batch": {"messages": [HI], "max_tokens": 2},
    "/inference/v1/generate": {"token_ids": [1, 2], "sampling_params": {"max_tokens": 2}},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2]},
    "/v1/embeddings": {"input": "hi"},
}


def _nested(depth: int) -> Any:
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


def _deep_text(depth: int) -> bytes:
    # Built as text: json.dumps itself would hit the recursion limit on the deepest ones.
    return b'{"a":' * depth + b"1" + b"}" * depth


def _post_raw(
    server: ServerProcess, path: str, body: bytes, content_type: str = "application/json"
) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}{path}", content=body, headers={"content-type": content_type}, timeout=120
    )


def _assert_error(resp: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Recursion" not in error["message"] and "Traceback" not in error["message"]
    return error


def _greedy_text(server: ServerProcess) -> str:
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=GREEDY_CHAT, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path", list(POST_ROUTES))
def test_deeply_nested_bodies_are_400_on_every_route(default_server: ServerProcess, path: str) -> None:
    for body in (_deep_text(50_000), b"[" * 100_000 + b"]" * 100_000):
        error = _assert_error(_post_raw(default_server, path, body))
        assert str(MAX_JSON_DEPTH) in error["message"]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/chat/completions", "chat_template_kwargs"),
        ("/v1/chat/completions", "guided_json"),
        ("/v1/chat/completions", "tools"),
        ("/v1/completions", "guided_json"),
        ("/inference/v1/generate", "sampling_params"),
    ],
)
def test_deep_nesting_inside_a_field_is_400_and_shallow_nesting_passes(
    default_server: ServerProcess, path: str, field: str
) -> None:
    base = POST_ROUTES[path]
    deep = json.dumps(base)[:-1].encode() + f', "{field}": '.encode() + _deep_text(2_000) + b"}"
    _assert_error(_post_raw(default_server, path, deep))
    # 40 levels is within the bound: the field is then judged on its merits, never with a 500.
    shallow = {**base, field: _nested(40)}
    assert httpx.post(f"{default_server.base_url}{path}", json=shallow, timeout=120).status_code < 500


def test_a_deep_string_of_brackets_is_only_text(default_server: ServerProcess) -> None:
    prompt = "[" * 5_000 + "{" * 5_000
    resp = httpx.post(f"{default_server.base_url}/tokenize", json={"prompt": prompt}, timeout=60)
    assert resp.status_code == 200 and resp.json()["count"] > 0


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", ""],
)
def test_bodies_not_declared_json_are_400(default_server: ServerProcess, content_type: str) -> None:
    body = json.dumps(GREEDY_CHAT).encode()
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
        error = _assert_error(_post_raw(default_server, path, body, content_type))
        assert "application/json" in error["message"]
    # JSON with a charset parameter, and structured-syntax JSON types, are JSON.
    assert (
        _post_raw(
            default_server, "/tokenize", b'{"prompt": "hi"}', "application/json; charset=utf-8"
        ).status_code
        == 200
    )
    assert (
        _post_raw(default_server, "/tokenize", b'{"prompt": "hi"}', "application/vnd.api+json").status_code
        == 200
    )


@pytest.mark.parametrize("key", ["messages", "tools", "documents", "add_generation_prompt"])
def test_reserved_chat_template_kwargs_are_400(default_server: ServerProcess, key: str) -> None:
    body = {**GREEDY_CHAT, "chat_template_kwargs": {key: []}}
    for path, payload in (
        ("/v1/chat/completions", body),
        ("/v1/chat/completions/batch", {**body, "messages": [HI]}),
        ("/tokenize", {"messages": HI, "chat_template_kwargs": {key: []}}),
    ):
        resp = httpx.post(f"{default_server.base_url}{path}", json=payload, timeout=120)
        error = _assert_error(resp)
        assert error["param"] == "chat_template_kwargs" and key in error["message"]


def test_the_server_still_answers_greedily_after_hostile_input(default_server: ServerProcess) -> None:
    before = _greedy_text(default_server)
    for path in POST_ROUTES:
        _post_raw(default_server, path, _deep_text(50_000))
        _post_raw(default_server, path, b"a=1&b=2", "application/x-www-form-urlencoded")
    assert _greedy_text(default_server) == before


def _health_latencies(server: ServerProcess, busy: threading.Thread) -> list[float]:
    latencies = []
    with httpx.Client(timeout=60) as client:
        while busy.is_alive():
            started = time.monotonic()
            assert client.get(f"{server.base_url}/health").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
    return latencies


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_a_huge_prompt_does_not_stall_the_readiness_probe(default_server: ServerProcess, path: str) -> None:
    """Tokenizing 4 MB of text takes seconds; it runs on a worker thread with the GIL released, so
    /health keeps answering at once (before, it waited for the whole tokenization)."""
    text = "lorem ipsum dolor sit amet " * 150_000
    body = {"prompt": text, "max_tokens": 2} if path != "/v1/chat/completions" else {}
    if path == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": 2}
    statuses: list[int] = []
    busy = threading.Thread(
        target=lambda: statuses.append(
            httpx.post(f"{default_server.base_url}{path}", json=body, timeout=300).status_code
        )
    )
    started = time.monotonic()
    busy.start()
    latencies = _health_latencies(default_server, busy)
    busy.join()
    took = time.monotonic() - started
    # The prompt is longer than the context: a 400 for completions and chat, the token count for /tokenize.
    assert statuses == [200 if path == "/tokenize" else 400]
    assert len(latencies) >= 3, f"the request took only {took:.2f} s; make the prompt longer"
    assert max(latencies) < 1.5, f"/health took {max(latencies):.2f} s while a {took:.1f} s request ran"


def test_fan_out_past_max_batch_size_is_400_before_any_work(default_server: ServerProcess) -> None:
    url = default_server.base_url
    started = time.monotonic()
    batch = httpx.post(f"{url}/v1/chat/completions/batch", json={"messages": [HI] * 1025}, timeout=60)
    assert _assert_error(batch)["param"] == "messages"
    many = httpx.post(f"{url}/v1/completions", json={"prompt": ["hi"] * 1025, "max_tokens": 1}, timeout=60)
    assert _assert_error(many)["param"] == "prompt"
    times_n = httpx.post(f"{url}/v1/completions", json={"prompt": ["hi"] * 600, "n": 2}, timeout=60)
    assert "1200" in _assert_error(times_n)["message"]
    assert time.monotonic() - started < 10


def _engines_idle(server: ServerProcess) -> bool:
    engines = httpx.get(f"{server.base_url}/load", timeout=10).json()["engines"]
    return all(e["outstanding"] == 0 and not e["num_running"] and not e["num_waiting"] for e in engines)


def test_a_batch_whose_client_leaves_is_aborted_everywhere(default_server: ServerProcess) -> None:
    body = {"messages": [HI] * 24, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{default_server.base_url}/v1/chat/completions/batch", json=body, timeout=2)
    deadline = time.monotonic() + 20
    while not _engines_idle(default_server):
        assert time.monotonic() < deadline, httpx.get(f"{default_server.base_url}/load").text
        time.sleep(0.2)


def _tool(i: int) -> dict[str, Any]:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    return {"type": "function", "function": {"name": f"tool_{i}", "parameters": parameters}}


LONG_NAME = "x" * 10_000
STRUCTURED_LIMITS = {
    "50,000 choices": {"structured_outputs": {"choice": [f"option {i}" for i in range(50_000)]}},
    "10,000-char property": {
        "structured_outputs": {
            "json": {"type": "object", "properties": {LONG_NAME: {"type": "string"}}, "required": [LONG_NAME]}
        }
    },
    "5,000-alternative grammar": {
        "structured_outputs": {"grammar": "start: " + " | ".join(f'"alt{i}"' for i in range(5_000))}
    },
    "regex a{99999999}": {"structured_outputs": {"regex": "a{99999999}"}},
    # One past the cap: 2,000 tools compile and answer 200 (benchmarks/RESULTS.md), 2,001 hit llguidance's
    # row limit, which the cap turns into a plain 400 before any grammar work.
    "2,001 tools, tool_choice required": {
        "tools": [_tool(i) for i in range(2_001)],
        "tool_choice": "required",
    },
}


@pytest.mark.parametrize("case", list(STRUCTURED_LIMITS))
def test_structured_output_limits_are_400_before_generation(default_server: ServerProcess, case: str) -> None:
    body = {**GREEDY_CHAT, "max_tokens": 64, "temperature": 1.0, **STRUCTURED_LIMITS[case]}
    started = time.monotonic()
    resp = httpx.post(f"{default_server.base_url}/v1/chat/completions", json=body, timeout=300)
    error = _assert_error(resp)
    assert "\n" not in error["message"] and "<state>" not in error["message"], error["message"]
    assert "<non-verbose/>" not in error["message"], error["message"]
    assert error["param"] in ("structured_outputs", "tool_choice", "tools")
    assert time.monotonic() - started < 30
