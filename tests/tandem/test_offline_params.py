"""The offline `SamplingParams` and an HTTP body with the same fields become the same engine settings,
through the one input processor (no HTTP request object is built on the way)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from frontend.errors import APIError
from frontend.schemas import decode_completion_request
from frontend.schemas.to_sampling import from_openai
from frontend.serving.input_processor import InputProcessor
from protocol.messages import Ready, StructuredSpec
from tandem.offline_params import SamplingParams, StructuredOutputsParams

VOCAB = 512


def _inputs(**ready_fields: Any) -> InputProcessor:
    ready = Ready("e", ["m"], 100, VOCAB, 8, 16, "{}", None, None, None, [2], False, **ready_fields)
    return InputProcessor(ready)


def _http(**fields: Any) -> Any:
    return from_openai(decode_completion_request(json.dumps({"prompt": "hi", **fields}).encode()))


SAME_SETTINGS: dict[str, Any] = {
    "max_tokens": 7,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "min_p": 0.1,
    "presence_penalty": 0.2,
    "frequency_penalty": -0.3,
    "repetition_penalty": 1.1,
    "seed": 3,
    "min_tokens": 2,
    "stop_token_ids": [5, 2, 6],
    "logprobs": 3,
    "prompt_logprobs": 1,
    "allowed_token_ids": [4, 5, 6],
}


def test_offline_and_http_settings_give_the_same_wire_struct() -> None:
    inputs = _inputs()
    offline = SamplingParams(**SAME_SETTINGS, logit_bias={9: 1.5}).to_request()
    http = _http(**SAME_SETTINGS, logit_bias={"9": 1.5})
    assert inputs.sampling(offline, 10) == inputs.sampling(http, 10)
    wire = inputs.sampling(offline, 10)
    assert wire.stop_token_ids == [5, 6] and wire.logit_bias == {9: 1.5}  # EOS (2) is implied


def test_offline_constraints_map_like_the_server_s() -> None:
    inputs = _inputs()
    schema = {"type": "object"}
    by_shortcut = inputs.sampling(SamplingParams(json_schema=schema).to_request(), 10)
    nested = inputs.sampling(
        SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)).to_request(), 10
    )
    http = inputs.sampling(_http(structured_outputs={"json": schema}), 10)
    assert by_shortcut.structured == nested.structured == http.structured
    assert http.structured == StructuredSpec(json_schema='{"type":"object"}')


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(temperature=3.0), "`temperature` must be in [0, 2], got 3.0."),
        (SamplingParams(min_tokens=20, max_tokens=5), "`min_tokens` (20) must not exceed `max_tokens` (5)."),
        (SamplingParams(stop=""), "`stop` must not contain an empty string."),
        (SamplingParams(logprobs=-2), "`logprobs` must be -1 (all) or at least 0, got -2."),
        (
            SamplingParams(structured_outputs=StructuredOutputsParams()),
            "`structured_outputs` must set exactly one of json, regex, choice, grammar, json_object.",
        ),
    ],
)
def test_offline_checks_use_the_server_s_words(params: SamplingParams, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        params.to_request()
    assert str(caught.value) == message


def test_model_checks_happen_in_the_input_processor() -> None:
    inputs = _inputs(max_logprobs=4)
    with pytest.raises(APIError, match="maximum context length is 100") as caught:
        inputs.sampling(SamplingParams(max_tokens=95).to_request(), 10)
    assert caught.value.param == "max_tokens"
    with pytest.raises(APIError, match="greater than max allowed: 4"):
        inputs.sampling(SamplingParams(logprobs=5).to_request(), 10)
    with pytest.raises(APIError, match="outside the vocabulary"):
        inputs.sampling(SamplingParams(allowed_token_ids=[VOCAB]).to_request(), 10)
