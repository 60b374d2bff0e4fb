"""POST /inference/v1/generate (tokens in, tokens out) against the default model."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_process import ServerProcess

PROMPT = "The three primary colours are"
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def _url(server: ServerProcess) -> str:
    return f"{server.base_url}/inference/v1/generate"


def _prompt_ids(server: ServerProcess) -> list[int]:
    return httpx.post(f"{server.base_url}/tokenize", json={"prompt": PROMPT}, timeout=60).json()["tokens"]


def _stream(server: ServerProcess, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", _url(server), json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                chunks.append({"done": True} if payload == "[DONE]" else json.loads(payload))
    assert chunks[-1] == {"done": True}
    return chunks[:-1]


def test_non_streaming_and_streaming_agree_token_for_token(default_server: ServerProcess) -> None:
    ids = _prompt_ids(default_server)
    body = {"token_ids": ids, "sampling_params": GREEDY, "request_id": "my-req-1"}
    full = httpx.post(_url(default_server), json=body, timeout=120).json()
    assert full["request_id"] == "my-req-1"
    choice = full["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and len(choice["token_ids"]) == 8
    assert full["usage"]["prompt_tokens"] == len(ids) and full["usage"]["completion_tokens"] == 8

    chunks = _stream(default_server, body)
    streamed = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert streamed == choice["token_ids"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)

    # The same tokens, turned into text, are what /v1/completions answers for the same prompt.
    completion = httpx.post(
        f"{default_server.base_url}/v1/completions",
        json={"prompt": ids, **GREEDY},
        timeout=120,
    ).json()
    text = httpx.post(
        f"{default_server.base_url}/detokenize", json={"tokens": choice["token_ids"]}, timeout=60
    ).json()["prompt"]
    assert text == completion["choices"][0]["text"]


def test_stream_usage_chunks_as_asked(default_server: ServerProcess) -> None:
    ids = _prompt_ids(default_server)
    body = {"token_ids": ids, "sampling_params": {**GREEDY, "max_tokens": 3}}
    chunks = _stream(default_server, {**body, "stream_options": {"include_usage": True}})
    assert [c["choices"] for c in chunks][-1] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 3,
        "total_tokens": len(ids) + 3,
        "prompt_tokens_details": {
            "cached_tokens": chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"]
        },
    }
    assert all("usage" not in c for c in chunks[:-1])

    continuous = _stream(
        default_server,
        {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    completion_counts = [c["usage"]["completion_tokens"] for c in continuous]
    assert completion_counts == [1, 2, 3, 3]
    assert all(
        c["usage"]["total_tokens"] == len(ids) + n for c, n in zip(continuous, completion_counts, strict=True)
    )


def test_logprobs_and_prompt_logprobs(default_server: ServerProcess) -> None:
    ids = _prompt_ids(default_server)
    sampling = {**GREEDY, "max_tokens": 2, "logprobs": 2, "prompt_logprobs": 1}
    body = httpx.post(
        _url(default_server), json={"token_ids": ids, "sampling_params": sampling}, timeout=120
    ).json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 2 and all(len(entry["top_logprobs"]) == 2 for entry in content)
    # As vLLM's tokens-out endpoint: tokens as `token_id:N`, no bytes, the sampled token first.
    assert [entry["token"] for entry in content] == [f"token_id:{t}" for t in choice["token_ids"]]
    for entry in content:
        assert entry["bytes"] is None
        assert (entry["top_logprobs"][0]["token"], entry["top_logprobs"][0]["logprob"]) == (
            entry["token"],
            entry["logprob"],
        )
        # Greedy: the sampled token is the most likely one.
        assert entry["logprob"] == max(t["logprob"] for t in entry["top_logprobs"])
    prompt_lps = body["prompt_logprobs"]
    assert len(prompt_lps) == len(ids) and prompt_lps[0] is None
    for position, token_id in enumerate(ids[1:], 1):
        assert str(token_id) in prompt_lps[position]


def test_logprobs_zero_returns_the_sampled_tokens_logprob(default_server: ServerProcess) -> None:
    ids = _prompt_ids(default_server)
    sampling = {"max_tokens": 4, "temperature": 1.0, "seed": 3, "ignore_eos": True, "logprobs": 0}
    body = httpx.post(
        _url(default_server), json={"token_ids": ids, "sampling_params": sampling}, timeout=120
    ).json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == len(choice["token_ids"]) == 4
    for entry, token_id in zip(content, choice["token_ids"], strict=True):
        assert entry["token"] == f"token_id:{token_id}" and entry["logprob"] <= 0
        assert entry["top_logprobs"] == [
            {"token": entry["token"], "logprob": entry["logprob"], "bytes": None}
        ]


def test_detokenize_false_refuses_stop_strings(default_server: ServerProcess) -> None:
    ids = _prompt_ids(default_server)
    refused = httpx.post(
        _url(default_server),
        json={"token_ids": ids, "sampling_params": {**GREEDY, "detokenize": False, "stop": ["\n"]}},
        timeout=60,
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "sampling_params.stop"
    # Stop token ids need no text: the same request with them is served.
    served = httpx.post(
        _url(default_server),
        json={"token_ids": ids, "sampling_params": {**GREEDY, "detokenize": False, "stop_token_ids": [198]}},
        timeout=120,
    )
    assert served.status_code == 200, served.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"token_ids": [1, 2], "stream_options": {"include_usage": True}}, "stream_options"),
        ({"token_ids": []}, "token_ids"),
        ({"token_ids": [1, 2], "sampling_params": {"max_tokens": 0}}, "sampling_params.max_tokens"),
        (
            {"token_ids": [1, 2], "sampling_params": {"prompt_logprobs": -2}},
            "sampling_params.prompt_logprobs",
        ),
        ({"token_ids": [1, 10**7]}, "token_ids"),
        ({"token_ids": [1, -3]}, "token_ids"),
        ({"token_ids": [1, 2], "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ({"sampling_params": {}}, "token_ids"),
    ],
)
def test_validation_errors(default_server: ServerProcess, body: dict, param: str) -> None:
    response = httpx.post(_url(default_server), json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_model_is_404(default_server: ServerProcess) -> None:
    response = httpx.post(_url(default_server), json={"token_ids": [1, 2], "model": "nope"}, timeout=60)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
