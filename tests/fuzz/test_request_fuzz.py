"""Hypothesis fuzzer over request bodies, against one real server: every endpoint, every field of its
request struct set to hostile values (wrong types, +-2^64, NaN/Infinity, lone surrogates, 100k-char
strings, deep nesting, huge arrays). No response may be a 5xx, every rejection is an OpenAI error body,
and the server answers the same greedy request identically afterwards."""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.openapi import request_bodies
from tests.fuzz.conftest import (
    FUZZ_EXAMPLES,
    bound_generation,
    check_response,
    check_rss_after_fuzz,
    greedy_answer,
    warm_api_rss_mib,
)
from tests.server_process import ServerProcess

HI = [{"role": "user", "content": "hi"}]
# A valid body per route, kept cheap: one or two generated tokens.
BASE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": HI, "max_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions/batch": {"messages": [HI, HI], "max_tokens": 2},
    "/inference/v1/generate": {"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2, 3]},
    "/v1/embeddings": {"input": "hi"},
}
DEEP = "__DEEP__"  # replaced by 10,000 levels of raw JSON nesting after serialization
EXTREME_INTS = [2**64, -(2**64), 2**63, -(2**63) - 1, 2**64 - 1, 2**31, -1, 0, 10**30]

hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-8, max_value=8),  # small: a valid max_tokens or n must stay cheap
    st.sampled_from(EXTREME_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "x" * 100_000, "{" * 5_000, DEEP]),
    st.lists(st.integers(min_value=-3, max_value=60_000), max_size=5),
    st.just([0] * 20_000),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["role", "content", "type", "text"]), st.text(max_size=5))),
)


def _fields(path: str) -> list[str]:
    struct = request_bodies()[path][1]
    fields = list(struct.__struct_fields__)
    if path == "/inference/v1/generate":  # its sampling fields are nested; fuzz those too
        fields += [f"sampling_params.{f}" for f in msgspec.structs.fields(struct)[1].type.__struct_fields__]
    return fields


def _serialize(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, allow_nan=True)  # NaN/Infinity as the bare literals some clients send
    return text.replace(f'"{DEEP}"', '{"a":' * 10_000 + "1" + "}" * 10_000).encode()


def _mutate(path: str, changes: list[tuple[str, Any]], drop: list[str]) -> dict[str, Any]:
    body = json.loads(json.dumps(BASE_BODIES[path]))
    for name in drop:
        body.pop(name, None)
    for name, value in changes:
        target = body
        if "." in name:
            outer, name = name.split(".", 1)
            target = body.setdefault(outer, {})
            if not isinstance(target, dict):
                continue
        target[name] = value
    bound_generation(body)
    return body


@pytest.fixture(scope="module")
def greedy_before(default_server: ServerProcess) -> str:
    return greedy_answer(default_server)


@pytest.fixture(scope="module")
def rss_before(default_server: ServerProcess, greedy_before: str) -> float:
    return warm_api_rss_mib(default_server)


@pytest.mark.parametrize("path", list(BASE_BODIES))
def test_hostile_bodies_never_get_a_5xx(
    default_server: ServerProcess, greedy_before: str, rss_before: float, path: str
) -> None:
    fields = _fields(path)
    client = httpx.Client(base_url=default_server.base_url, timeout=120)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        changes=st.lists(st.tuples(st.sampled_from(fields), hostile), min_size=1, max_size=4),
        drop=st.lists(st.sampled_from(list(BASE_BODIES[path])), max_size=1),
    )
    def run(changes: list[tuple[str, Any]], drop: list[str]) -> None:
        body = _serialize(_mutate(path, changes, drop))
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
        check_response(resp.status_code, resp.text, f"POST {path} {body[:300]!r}")

    try:
        run()
    finally:
        client.close()


def test_the_server_answers_the_same_greedy_request_afterwards(
    default_server: ServerProcess, greedy_before: str, rss_before: float
) -> None:
    assert greedy_answer(default_server) == greedy_before
    check_rss_after_fuzz(default_server, rss_before, "body fuzz")
