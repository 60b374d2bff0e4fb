"""Request -> SamplingParams: defaults, the context-length budget, vocab checks, structured outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from frontend.errors import APIError
from frontend.sampling_params import build_sampling_params, check_prompt_token_ids
from frontend.schemas import decode_chat_request, decode_completion_request
from frontend.schemas.to_sampling import from_openai
from protocol.messages import SamplingParams, StructuredSpec

VOCAB = 512
EOS = [2]


def chat_params(num_prompt_tokens: int = 10, max_model_len: int = 100, **fields: Any) -> SamplingParams:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()
    return build_sampling_params(
        from_openai(decode_chat_request(body)),
        num_prompt_tokens=num_prompt_tokens,
        max_model_len=max_model_len,
        vocab_size=VOCAB,
        eos_token_ids=EOS,
    )


def completion_params(num_prompt_tokens: int = 10, **fields: Any) -> SamplingParams:
    body = json.dumps({"model": "m", "prompt": "hi", **fields}).encode()
    return build_sampling_params(
        from_openai(decode_completion_request(body)),
        num_prompt_tokens=num_prompt_tokens,
        max_model_len=100,
        vocab_size=VOCAB,
        eos_token_ids=EOS,
    )


def test_defaults() -> None:
    params = chat_params()
    assert params == SamplingParams(max_tokens=90)  # all the room left, every other field at its default
    assert params.top_k is None and params.logprobs is None and params.structured is None


def test_every_field_is_carried() -> None:
    params = chat_params(
        max_tokens=20,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        seed=7,
        min_tokens=3,
        stop_token_ids=[5, 6, 5],
        ignore_eos=True,
        prompt_logprobs=2,
        logit_bias={"11": 5.0, "12": -100},
        allowed_token_ids=[1, 2, 3],
    )
    assert params == SamplingParams(
        max_tokens=20,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        seed=7,
        min_tokens=3,
        stop_token_ids=[5, 6],
        ignore_eos=True,
        prompt_logprobs=2,
        logit_bias={11: 5.0, 12: -100.0},
        allowed_token_ids=[1, 2, 3],
    )


@pytest.mark.parametrize("top_k", [-1, 0])
def test_top_k_disabled_values_become_none(top_k: int) -> None:
    assert chat_params(top_k=top_k).top_k is None


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat_params(max_tokens=50, max_completion_tokens=7).max_tokens == 7


def test_default_max_tokens_is_clamped_to_the_room_left() -> None:
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    req = from_openai(decode_completion_request(body))
    kwargs: dict[str, Any] = {"max_model_len": 100, "vocab_size": VOCAB, "eos_token_ids": EOS}
    assert build_sampling_params(req, num_prompt_tokens=10, default_max_tokens=16, **kwargs).max_tokens == 16
    assert build_sampling_params(req, num_prompt_tokens=95, default_max_tokens=16, **kwargs).max_tokens == 5


def test_context_overflow_states_the_numbers() -> None:
    with pytest.raises(APIError) as caught:
        chat_params(num_prompt_tokens=60, max_model_len=100, max_tokens=50)
    err = caught.value
    assert (err.status, err.param) == (400, "max_tokens")
    assert err.message.startswith(
        "This model's maximum context length is 100 tokens. However, you requested 110 tokens "
        "(60 in the messages, 50 in the completion). Please reduce"
    )
    with pytest.raises(APIError) as caught:
        chat_params(num_prompt_tokens=60, max_model_len=100, max_completion_tokens=41)
    assert caught.value.param == "max_completion_tokens"
    assert chat_params(num_prompt_tokens=60, max_model_len=100, max_tokens=40).max_tokens == 40


@pytest.mark.parametrize("num_prompt_tokens", [100, 150])
def test_prompt_alone_too_long(num_prompt_tokens: int) -> None:
    with pytest.raises(APIError) as caught:
        chat_params(num_prompt_tokens=num_prompt_tokens, max_model_len=100)
    assert caught.value.param == "messages"
    assert f"{num_prompt_tokens} input tokens" in caught.value.message
    with pytest.raises(APIError) as caught:
        completion_params(num_prompt_tokens=num_prompt_tokens)
    assert caught.value.param == "prompt"


def test_min_tokens_beyond_the_room_left() -> None:
    with pytest.raises(APIError) as caught:
        chat_params(num_prompt_tokens=95, min_tokens=10)
    assert caught.value.param == "min_tokens"


def test_logprobs_mapping() -> None:
    assert chat_params(logprobs=True).logprobs == 0
    assert chat_params(logprobs=True, top_logprobs=4).logprobs == 4
    assert chat_params(logprobs=False).logprobs is None
    assert completion_params(logprobs=3).logprobs == 3
    assert completion_params().logprobs is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ],
)
def test_logprobs_past_the_server_limit_are_refused(fields: dict[str, Any], param: str) -> None:
    """vLLM's rule: --max-logprobs (20 by default) bounds every count; -1 ("all") counts as the vocabulary."""
    with pytest.raises(APIError) as caught:
        chat_params(**fields)
    assert caught.value.param == param
    assert "greater than max allowed: 20" in caught.value.message


def test_minus_one_is_the_whole_vocabulary_when_the_server_allows_it() -> None:
    body = json.dumps({"model": "m", "prompt": "hi", "logprobs": -1, "prompt_logprobs": -1}).encode()
    options: dict[str, Any] = {"num_prompt_tokens": 3, "max_model_len": 100, "eos_token_ids": EOS}
    everything = build_sampling_params(
        from_openai(decode_completion_request(body)), vocab_size=VOCAB, max_logprobs=-1, **options
    )
    assert (everything.logprobs, everything.prompt_logprobs) == (VOCAB, VOCAB)
    wide = build_sampling_params(
        from_openai(decode_completion_request(body)), vocab_size=VOCAB, max_logprobs=600, **options
    )
    assert wide.logprobs == VOCAB


@pytest.mark.parametrize(
    ("fields", "param", "token"),
    [
        ({"logit_bias": {str(VOCAB): 1.0}}, "logit_bias", VOCAB),
        ({"stop_token_ids": [1, VOCAB + 3]}, "stop_token_ids", VOCAB + 3),
        ({"allowed_token_ids": [VOCAB]}, "allowed_token_ids", VOCAB),
    ],
)
def test_token_ids_outside_the_vocab(fields: dict[str, Any], param: str, token: int) -> None:
    with pytest.raises(APIError) as caught:
        chat_params(**fields)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert str(token) in caught.value.message


def test_prompt_token_ids_check() -> None:
    check_prompt_token_ids([0, VOCAB - 1], vocab_size=VOCAB)
    with pytest.raises(APIError) as caught:
        check_prompt_token_ids([1, VOCAB], vocab_size=VOCAB, param="prompt[1]")
    assert caught.value.param == "prompt[1]"


def test_eos_in_stop_token_ids_is_dropped_unless_ignore_eos() -> None:
    assert chat_params(stop_token_ids=[2, 9]).stop_token_ids == [9]
    assert chat_params(stop_token_ids=[2, 9], ignore_eos=True).stop_token_ids == [2, 9]


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(
    ("fields", "spec"),
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredSpec(any_json_object=True)),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
            StructuredSpec(json_schema=json.dumps(SCHEMA, separators=(",", ":"))),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            StructuredSpec(any_json_object=True),
        ),
        (
            {"structured_outputs": {"json": SCHEMA}},
            StructuredSpec(json_schema=json.dumps(SCHEMA, separators=(",", ":"))),
        ),
        (
            {"structured_outputs": {"json": '{"type": "string"}'}},
            StructuredSpec(json_schema='{"type": "string"}'),
        ),
        ({"structured_outputs": {"regex": "a+"}}, StructuredSpec(regex="a+")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredSpec(choice=["yes", "no"])),
        ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredSpec(grammar='root ::= "x"')),
        ({"structured_outputs": {"json_object": True}}, StructuredSpec(any_json_object=True)),
        ({"guided_json": SCHEMA}, StructuredSpec(json_schema=json.dumps(SCHEMA, separators=(",", ":")))),
        ({"guided_regex": "[0-9]+"}, StructuredSpec(regex="[0-9]+")),
        ({"guided_choice": ["a"]}, StructuredSpec(choice=["a"])),
        ({"guided_grammar": 'start: "g"'}, StructuredSpec(grammar='start: "g"')),
    ],
)
def test_structured_outputs_mapping(fields: dict[str, Any], spec: StructuredSpec | None) -> None:
    assert chat_params(**fields).structured == spec
    assert completion_params(**fields).structured == spec


def test_structured_override_is_the_tool_hook() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = from_openai(decode_chat_request(body))
    tool_spec = StructuredSpec(json_schema='{"type":"object"}')
    kwargs: dict[str, Any] = {
        "num_prompt_tokens": 1,
        "max_model_len": 10,
        "vocab_size": VOCAB,
        "eos_token_ids": EOS,
    }
    assert build_sampling_params(req, structured_override=tool_spec, **kwargs).structured == tool_spec
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "guided_regex": "a"}).encode()
    with pytest.raises(APIError) as caught:
        build_sampling_params(from_openai(decode_chat_request(body)), structured_override=tool_spec, **kwargs)
    assert caught.value.param == "tool_choice"
