"""Prefix caching through the server: a shared 256-token prefix is served from cache, output unchanged."""

from __future__ import annotations

import random

import httpx

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess


def _complete(server: ServerProcess, prompt: list[int]) -> dict:
    body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    resp = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_shared_256_token_prefix_is_cached_and_output_is_unchanged(default_server: ServerProcess) -> None:
    rng = random.Random(20261121)
    prefix = [rng.randrange(100, 40000) for _ in range(256)]  # unique to this test: cold cache
    cold = _complete(default_server, prefix + [1000, 2000, 3000])
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    warm = _complete(default_server, prefix + [1000, 2000, 3000])
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] >= 240
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]  # the cold run computed everything
    other_suffix = _complete(default_server, prefix + [4000, 5000])
    assert other_suffix["usage"]["prompt_tokens_details"]["cached_tokens"] >= 240


def _complete_ids(server: ServerProcess, prompt: list[int], salt: str | None = None) -> dict:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "prompt": prompt,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 1,
        "return_token_ids": True,
    }
    if salt is not None:
        body["cache_salt"] = salt  # a chain of its own: nothing cached by other requests is read
    resp = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_repeated_prompt_and_the_next_turn_reuse_the_partial_block_where_the_last_one_ended(
    default_server: ServerProcess,
) -> None:
    """Past the whole 16-token blocks, a prompt that repeats where an earlier request's tokens ended copies
    those tokens' KV (engine/kv_cache.py): only the last prompt token is computed, and the output is the
    same as from a prompt computed in full."""
    rng = random.Random(20261204)
    prompt = [rng.randrange(100, 40000) for _ in range(259)]  # 16 whole blocks + 3 tokens
    cold = _complete_ids(default_server, prompt)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    warm = _complete_ids(default_server, prompt)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 258  # 256 shared + 2 copied
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    for a, b in zip(warm["choices"][0]["logprobs"]["token_logprobs"], cold["choices"][0]["logprobs"]["token_logprobs"], strict=True):  # fmt: skip
        assert abs(a - b) < 1e-4
    # The next turn: the prompt, its answer, then new tokens. The first request computed its prompt and
    # 11 of its 12 output tokens (the last sampled one never is): 270 positions to reuse.
    answer = cold["choices"][0]["token_ids"]
    assert len(answer) == 12
    turn = prompt + answer + [1000, 2000]
    warm_turn = _complete_ids(default_server, turn)
    assert warm_turn["usage"]["prompt_tokens_details"]["cached_tokens"] == 270
    cold_turn = _complete_ids(default_server, turn, salt="computed-in-full")
    assert cold_turn["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm_turn["choices"][0]["text"] == cold_turn["choices"][0]["text"]
