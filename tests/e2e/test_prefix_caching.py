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
