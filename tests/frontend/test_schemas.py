"""Request decoding: valid bodies parse, every bad input is a 400 that names its field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from frontend.errors import APIError
from frontend.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    decode_chat_request,
    decode_completion_request,
    prompt_kind,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": USER, **fields}).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "hi", **fields}).encode()


def test_full_chat_request_parses_and_ignores_unknown_fields() -> None:
    body = chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
            {"role": "tool", "content": "42", "tool_call_id": "1"},
        ],
        temperature=0.7,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        n=2,
        max_completion_tokens=10,
        stop=["\n\n", "END"],
        seed=2**63 - 1,
        logit_bias={"17": -100, "3": 2.5},
        logprobs=True,
        top_logprobs=5,
        stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        chat_template_kwargs={"enable_thinking": False},
        some_future_openai_field={"ignored": True},
        temperature_typo=3,
    )
    req = decode_chat_request(body)
    assert isinstance(req, ChatCompletionRequest)
    assert req.messages[1].content[1].text == "b"  # type: ignore[index,union-attr]
    assert req.messages[2].tool_calls == [{"id": "1", "type": "function"}]
    assert (req.temperature, req.top_k, req.n, req.max_completion_tokens) == (0.7, -1, 2, 10)
    assert req.stream_options is not None and req.stream_options.include_usage is True
    assert req.response_format is not None and req.response_format.json_schema is not None
    assert req.response_format.json_schema.schema == {"type": "object"}


def test_nulls_are_accepted_everywhere_optional() -> None:
    req = decode_chat_request(chat(temperature=None, stop=None, max_tokens=None, logprobs=None, n=None))
    assert req.temperature is None and req.stop is None and req.n is None


@pytest.mark.parametrize(
    ("prompt", "kind"),
    [("hi", "text"), (["a", "b"], "texts"), ([1, 2, 3], "tokens"), ([[1, 2], [3]], "token_lists")],
)
def test_completion_prompt_shapes(prompt: Any, kind: str) -> None:
    req = decode_completion_request(completion(prompt=prompt, logprobs=3, echo=True))
    assert isinstance(req, CompletionRequest)
    assert req.prompt == prompt and prompt_kind(prompt) == kind and req.logprobs == 3


def test_completion_with_prompt_embeds_only() -> None:
    body = json.dumps({"model": "m", "prompt_embeds": "AAAA"}).encode()
    assert decode_completion_request(body).prompt_embeds == "AAAA"


def test_prompt_embeds_content_part() -> None:
    body = chat(messages=[{"role": "user", "content": [{"type": "prompt_embeds", "data": "QUJD"}]}])
    part = decode_chat_request(body).messages[0].content[0]  # type: ignore[index]
    assert (part.type, part.data) == ("prompt_embeds", "QUJD")  # type: ignore[union-attr]


# (body, expected param) for the chat endpoint; every one must be a 400 invalid_request_error.
CHAT_BAD: list[tuple[bytes, str | None]] = [
    (b"{not json", None),
    (b"", None),
    (b"[]", None),
    (b'{"model": "m"}', "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages="hi"), "messages"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text"),
    (
        chat(
            messages=[
                USER[0],
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
            ]
        ),
        "messages[1].content[0].type",
    ),
    (chat(messages=[{"role": "user", "content": [{"type": "hologram"}]}]), "messages[0].content[0].type"),
    (
        chat(messages=[{"role": "user", "content": [{"type": "prompt_embeds"}]}]),
        "messages[0].content[0].data",
    ),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=-0.1), "temperature"),
    (chat(temperature=2.5), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"),
    (chat(top_k=-2), "top_k"),
    (chat(min_p=1.1), "min_p"),
    (chat(presence_penalty=2.1), "presence_penalty"),
    (chat(frequency_penalty=-3), "frequency_penalty"),
    (chat(repetition_penalty=0), "repetition_penalty"),
    (chat(n=0), "n"),
    (chat(n=129), "n"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(top_logprobs=-2, logprobs=True), "top_logprobs"),
    (chat(top_logprobs=3), "top_logprobs"),
    (chat(logprobs=3), "logprobs"),
    (chat(min_tokens=-1), "min_tokens"),
    (chat(min_tokens=5, max_tokens=4), "min_tokens"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream_options={"include_usage": True}, stream=False), "stream_options"),
    (chat(logit_bias={"abc": 1}), "logit_bias"),
    (chat(logit_bias={"5": 101}), "logit_bias"),
    (chat(logit_bias={"5": "x"}), "logit_bias"),
    (chat(seed=2**63), "seed"),
    (chat(seed=-(2**63) - 1), "seed"),
    (chat(stop=""), "stop"),
    (chat(stop=["a", ""]), "stop"),
    (chat(stop=[1]), "stop[0]"),
    (chat(stop_token_ids=[-1]), "stop_token_ids"),
    (chat(prompt_logprobs=-2), "prompt_logprobs"),
    (chat(truncation_side="middle"), "truncation_side"),
    (chat(prompt_logprobs=1, stream=True), "prompt_logprobs"),
    (chat(use_beam_search=True), "use_beam_search"),
    (chat(response_format={"type": "xml"}), "response_format.type"),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (chat(response_format={"type": "json_object"}, guided_regex="a+"), "guided_regex"),
    (chat(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
    (chat(structured_outputs={}), "structured_outputs"),
    (chat(guided_json="{oops"), "guided_json"),
    (chat(guided_json="[1]"), "guided_json"),
    (chat(guided_choice=[]), "guided_choice"),
    (chat(continue_final_message=True), "continue_final_message"),
    (
        chat(
            messages=[{"role": "assistant", "content": "x"}],
            continue_final_message=True,
            add_generation_prompt=True,
        ),
        "continue_final_message",
    ),
    (chat(stream="yes"), "stream"),
]

COMPLETION_BAD: list[tuple[bytes, str | None]] = [
    (b'{"model": "m"}', "prompt"),
    (completion(prompt=""), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=["a", ""]), "prompt"),
    (completion(prompt=[[1], []]), "prompt[1]"),
    (completion(prompt=[1, "a"]), "prompt"),
    (completion(prompt=[1, -5]), "prompt"),
    (completion(prompt=[True, 1]), "prompt"),
    (completion(prompt=[[1, 2.5]]), "prompt"),
    (completion(prompt=5), "prompt"),
    (completion(logprobs=-2), "logprobs"),
    (completion(logprobs=True), "logprobs"),
    (completion(suffix="tail"), "suffix"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(temperature=3), "temperature"),
    (completion(prompt_embeds=""), "prompt_embeds"),
    (completion(best_of=3, n=1), "best_of"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_BAD, ids=[str(i) for i in range(len(CHAT_BAD))])
def test_bad_chat_requests(body: bytes, param: str | None) -> None:
    with pytest.raises(APIError) as caught:
        decode_chat_request(body)
    err = caught.value
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", param), (body, err)
    assert err.message


@pytest.mark.parametrize(("body", "param"), COMPLETION_BAD, ids=[str(i) for i in range(len(COMPLETION_BAD))])
def test_bad_completion_requests(body: bytes, param: str | None) -> None:
    with pytest.raises(APIError) as caught:
        decode_completion_request(body)
    err = caught.value
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", param), (body, err)


def test_messages_are_specific() -> None:
    with pytest.raises(APIError, match="Invalid JSON body"):
        decode_chat_request(b"{")
    with pytest.raises(APIError, match=r"\[0, 2\], got 2.5"):
        decode_chat_request(chat(temperature=2.5))
    with pytest.raises(APIError, match="does not accept image input"):
        decode_chat_request(chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))
    with pytest.raises(APIError, match="Missing required field `messages`"):
        decode_chat_request(b"{}")


def test_edge_values_that_are_valid() -> None:
    req = decode_chat_request(
        chat(
            temperature=0, top_p=1, top_k=0, min_p=0, presence_penalty=-2, frequency_penalty=2, seed=-(2**63)
        )
    )
    assert req.temperature == 0 and req.top_k == 0
    assert decode_chat_request(chat(top_logprobs=0)).top_logprobs == 0  # 0 without logprobs is harmless
    assert decode_chat_request(chat(logprobs=True, top_logprobs=20)).top_logprobs == 20
    assert decode_completion_request(completion(logprobs=0, best_of=2, n=2)).logprobs == 0
    assert decode_chat_request(chat(max_tokens=5, max_completion_tokens=3, min_tokens=3)).min_tokens == 3


def test_pure_frontend_modules_do_not_import_torch() -> None:
    """API processes must start without torch or transformers (checked in a fresh interpreter)."""
    import subprocess
    import sys

    modules = [
        "frontend.errors",
        "frontend.sse",
        "frontend.schemas",
        "frontend.sampling_params",
        "frontend.serving.chat_template",
        "frontend.serving.detokenizer",
        "frontend.serving.stop_strings",
    ]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted(k for k in ('torch', 'transformers') if k in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
