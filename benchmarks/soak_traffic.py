"""The soak's traffic mix: one async function per kind of request, each returning whether the answer was
what that request deserves (a 200 with the right shape for valid ones, an OpenAI error body for bad ones).

Kept apart from benchmarks/soak.py (which starts the server, samples RSS and judges) so the mix can grow
without that file growing. Prompts are random words so prefix caching cannot serve everything from cache.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

WORDS = [
    "river",
    "stone",
    "cloud",
    "market",
    "engine",
    "garden",
    "signal",
    "winter",
    "paper",
    "orbit",
    "candle",
    "harbor",
    "violin",
    "forest",
    "number",
    "silver",
    "planet",
    "bridge",
    "window",
    "thunder",
    "lantern",
    "meadow",
    "copper",
    "falcon",
    "spiral",
    "island",
    "rocket",
    "velvet",
    "compass",
    "glacier",
    "ember",
    "anchor",
    "prism",
    "quartz",
    "nectar",
    "saddle",
    "tundra",
    "willow",
]

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
# Bodies every server must refuse with a 4xx and an OpenAI error body (raw bytes, content type).
INVALID_BODIES: list[tuple[bytes, str]] = [
    (b'{"model": "x", "messages": [', "application/json"),
    (b'{"messages": "not a list", "max_tokens": 4}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "application/json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 18446744073709551616}', "application/json"),
    (b'{"a":' * 300 + b"1" + b"}" * 300, "application/json"),
    (b"messages=hi", "application/x-www-form-urlencoded"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {" 1": 5}}', "application/json"),
]


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int  # 0: the client gave up on purpose (an abort)
    ok: bool
    detail: str = ""


Scenario = Callable[[httpx.AsyncClient, random.Random], Awaitable[Outcome]]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _chat_body(rng: random.Random, max_tokens: int, **extra: object) -> dict[str, object]:
    content = f"Write one sentence about {words(rng, rng.randint(3, 12))}."
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def _is_error_body(resp: httpx.Response) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return (
        isinstance(body, dict)
        and set(body) == {"error"}
        and {"message", "type", "param", "code"} <= set(body["error"])
    )


def _expect_200(kind: str, resp: httpx.Response, check: Callable[[dict], bool]) -> Outcome:
    if resp.status_code != 200:
        return Outcome(kind, resp.status_code, False, resp.text[:300])
    body = resp.json()
    return Outcome(kind, 200, check(body), "" if check(body) else json.dumps(body)[:300])


async def chat(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = _chat_body(rng, rng.randint(4, 24), temperature=rng.choice([0, 0.7, 1.0]))
    resp = await client.post("/v1/chat/completions", json=body)
    return _expect_200("chat", resp, lambda b: len(b["choices"]) == 1 and b["usage"]["completion_tokens"] > 0)


async def chat_logprobs(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = _chat_body(rng, 8, logprobs=True, top_logprobs=3, n=2, temperature=0.8)
    resp = await client.post("/v1/chat/completions", json=body)
    return _expect_200(
        "chat_n2_logprobs",
        resp,
        lambda b: len(b["choices"]) == 2 and all(len(c["logprobs"]["content"]) > 0 for c in b["choices"]),
    )


async def _read_stream(client: httpx.AsyncClient, path: str, body: dict) -> tuple[int, list[str], str]:
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            return resp.status_code, [], (await resp.aread()).decode(errors="replace")[:300]
        lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
        return 200, lines, ""


async def chat_stream(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = _chat_body(rng, rng.randint(8, 32), stream=True, stream_options={"include_usage": True})
    status, lines, detail = await _read_stream(client, "/v1/chat/completions", body)
    ok = status == 200 and lines[-1] == "data: [DONE]" and '"usage"' in lines[-2]
    return Outcome("chat_stream", status, ok, detail or ("" if ok else str(lines[-2:])[:300]))


async def completions(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = {
        "prompt": words(rng, rng.randint(4, 40)),
        "max_tokens": 8,
        "n": 2,
        "logprobs": 2,
        "temperature": 0.9,
    }
    resp = await client.post("/v1/completions", json=body)
    return _expect_200(
        "completions_n2_logprobs",
        resp,
        lambda b: len(b["choices"]) == 2 and all(c["logprobs"]["tokens"] for c in b["choices"]),
    )


async def completions_stream(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = {
        "prompt": words(rng, 10),
        "max_tokens": 16,
        "stream": True,
        "logprobs": 1,
        "echo": rng.random() < 0.3,
    }
    status, lines, detail = await _read_stream(client, "/v1/completions", body)
    ok = status == 200 and lines[-1] == "data: [DONE]" and len(lines) > 2
    return Outcome("completions_stream", status, ok, detail)


async def structured(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    body = _chat_body(rng, 48, response_format=fmt, temperature=0.7)

    def valid(b: dict) -> bool:
        choice = b["choices"][0]
        # Cut by max_tokens is allowed (temperature 0.7); a finished answer must parse as the schema.
        return choice["finish_reason"] == "length" or set(json.loads(choice["message"]["content"])) == {
            "name",
            "age",
        }

    return _expect_200("structured_json", await client.post("/v1/chat/completions", json=body), valid)


async def tools(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = _chat_body(rng, 48, tools=[WEATHER_TOOL], tool_choice="required", temperature=0.5)
    resp = await client.post("/v1/chat/completions", json=body)
    return _expect_200("tools_required", resp, lambda b: bool(b["choices"][0]["message"]["tool_calls"]))


async def long_prompt(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = _chat_body(rng, 4)
    body["messages"] = [{"role": "user", "content": words(rng, 1200) + "\nSummarize in three words."}]
    resp = await client.post("/v1/chat/completions", json=body)
    return _expect_200("long_prompt", resp, lambda b: b["usage"]["prompt_tokens"] > 1000)


async def batch_chat(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    conversations = [[{"role": "user", "content": words(rng, 6)}] for _ in range(3)]
    resp = await client.post("/v1/chat/completions/batch", json={"messages": conversations, "max_tokens": 6})
    return _expect_200("batch_chat", resp, lambda b: len(b["choices"]) == 3)


async def aborted_stream(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    """Reads two events of a long stream, then closes the connection: the server must abort it."""
    body = _chat_body(rng, 400, stream=True, ignore_eos=True)
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return Outcome("aborted_stream", resp.status_code, False, (await resp.aread()).decode()[:300])
        seen = 0
        async for line in resp.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= 2:
                break
    return Outcome("aborted_stream", 0, True)


async def dropped_request(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    """Gives up before any answer (a client timeout): the request is queued or prefilling when it goes."""
    body = _chat_body(rng, 300, ignore_eos=True)
    try:
        await client.post("/v1/chat/completions", json=body, timeout=rng.uniform(0.05, 1.0))
    except httpx.TimeoutException:
        return Outcome("dropped_request", 0, True)
    return Outcome("dropped_request", 200, True)  # it finished first: fine on an idle server


async def invalid(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    content, content_type = rng.choice(INVALID_BODIES)
    path = rng.choice(["/v1/chat/completions", "/v1/completions"])
    resp = await client.post(path, content=content, headers={"content-type": content_type})
    ok = 400 <= resp.status_code < 500 and _is_error_body(resp)
    return Outcome("invalid_body", resp.status_code, ok, "" if ok else resp.text[:300])


def embeddings_scenario(embed_client: httpx.AsyncClient) -> Scenario:
    async def embeddings(_client: httpx.AsyncClient, rng: random.Random) -> Outcome:
        inputs = [words(rng, rng.randint(2, 30)) for _ in range(rng.randint(1, 8))]
        resp = await embed_client.post("/v1/embeddings", json={"input": inputs})
        return _expect_200("embeddings", resp, lambda b: len(b["data"]) == len(inputs))

    return embeddings


# (scenario, weight): weights roughly as a chat-heavy public endpoint, with the rarer hostile kinds
# frequent enough to run hundreds of times in 20 minutes.
MIX: list[tuple[Scenario, int]] = [
    (chat, 6),
    (chat_stream, 6),
    (chat_logprobs, 2),
    (completions, 2),
    (completions_stream, 2),
    (structured, 2),
    (tools, 2),
    (long_prompt, 1),
    (batch_chat, 1),
    (aborted_stream, 2),
    (dropped_request, 1),
    (invalid, 3),
]
