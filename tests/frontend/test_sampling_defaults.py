"""The model's generation-config defaults (READY's `default_sampling`) fill the sampling fields a request
leaves unset; a value the request sends always wins."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from frontend.sampling_params import build_sampling_params
from frontend.schemas import decode_chat_request, decode_completion_request
from frontend.schemas.to_sampling import from_openai
from frontend.serving.model_context import ModelContext
from protocol.framing import decode, encode
from protocol.messages import Ready, SamplingParams

DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20.0, "min_p": 0.05, "repetition_penalty": 1.1}


def _chat(**fields: Any) -> Any:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return decode_chat_request(json.dumps(body).encode())


def _params(req: Any, defaults: dict[str, float], max_model_len: int = 100, **options: Any) -> SamplingParams:
    return build_sampling_params(
        from_openai(req),
        num_prompt_tokens=10,
        max_model_len=max_model_len,
        vocab_size=512,
        eos_token_ids=[2],
        model_defaults=defaults,
        **options,
    )


def test_unset_fields_take_the_model_defaults() -> None:
    params = _params(_chat(), DEFAULTS)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.6, 0.9, 20, 0.05)
    assert params.repetition_penalty == 1.1 and type(params.top_k) is int
    assert params.presence_penalty == 0.0 and params.max_tokens == 90  # not in the file: the API defaults
    # JSON null is "unset" too.
    assert _params(_chat(temperature=None, top_k=None), DEFAULTS).temperature == 0.6


def test_the_request_wins() -> None:
    explicit = dict(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0, max_tokens=7)
    params = _params(_chat(**explicit), {**DEFAULTS, "max_tokens": 9})
    assert params == _params(_chat(**explicit), {})
    assert params.top_k is None and params.max_tokens == 7
    # top_k 0 in the file means no cut, as in a request.
    assert _params(_chat(), {"top_k": 0}).top_k is None


def test_the_model_max_tokens_caps_every_request_as_in_vllm() -> None:
    assert _params(_chat(), {"max_tokens": 5}).max_tokens == 5
    assert _params(_chat(max_tokens=50), {"max_tokens": 5}).max_tokens == 5  # an explicit value too
    assert _params(_chat(), {"max_tokens": 500}, max_model_len=100).max_tokens == 90  # and the room caps it
    completion = decode_completion_request(b'{"model": "m", "prompt": "hi"}')
    # Legacy completions keep their default of 16 under a larger cap.
    assert _params(completion, {"max_tokens": 40}, default_max_tokens=16).max_tokens == 16
    assert _params(completion, {"max_tokens": 5}, default_max_tokens=16).max_tokens == 5
    assert _params(completion, {}, default_max_tokens=16).max_tokens == 16


def _ready(**fields: Any) -> Ready:
    return Ready("e", ["m"], 100, 512, 8, 16, "{}", None, None, None, [2], False, **fields)


def test_defaults_travel_in_ready_and_model_context_applies_them() -> None:
    sent = _ready(default_sampling={"temperature": 0.0, "top_k": 1, "max_tokens": 5})
    received, _ = decode(encode(sent))
    assert received.default_sampling == {"temperature": 0.0, "top_k": 1.0, "max_tokens": 5.0}
    ctx = ModelContext(received, tokenizer=None, chat_template=None, served_model_names=["m"])  # type: ignore[arg-type]
    params = ctx.inputs.sampling(from_openai(_chat()), 10)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 1, 5)
    assert ctx.inputs.sampling(from_openai(_chat(temperature=0.8, max_tokens=9)), 10).temperature == 0.8


def test_a_ready_without_the_field_means_no_defaults() -> None:
    # An engine from before the field: its READY ends earlier (array-like struct, defaults omitted).
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(_ready()), type=Ready)
    assert old.default_sampling == {}
    ctx = ModelContext(old, tokenizer=None, chat_template=None, served_model_names=["m"])  # type: ignore[arg-type]
    assert ctx.inputs.sampling(from_openai(_chat()), 10) == SamplingParams(max_tokens=90)
