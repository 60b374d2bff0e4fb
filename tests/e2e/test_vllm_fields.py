"""Issue 16 (items 1-6): vLLM's response fields and logprob options, as vLLM's own OpenAI-server tests
read them: `return_token_ids`, `truncation_side`, `return_tokens_as_token_ids`, extension fields present
as null, chat `echo`, completions' `top_logprobs` order and `continuous_usage_stats` counts."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from tests.conftest import DEFAULT_MODEL_NAME
from tests.e2e.test_sampling_params import FRANCE, FRANCE_PROMPT, chat, complete, stream_chunks
from tests.server_process import ServerProcess

LONG_PROMPT = "Once upon a time there was a lighthouse keeper who loved the sea. The capital of France is"
PREFILL = [
    {"role": "user", "content": "Tell me about yourself."},
    {"role": "assistant", "content": "Hello, my"},
]


def _tokenize(server: ServerProcess, **body: Any) -> list[int]:
    response = httpx.post(
        f"{server.base_url}/tokenize", json={"model": DEFAULT_MODEL_NAME, **body}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def _detokenize(server: ServerProcess, token_ids: list[int]) -> str:
    response = httpx.post(f"{server.base_url}/detokenize", json={"tokens": token_ids}, timeout=60)
    return response.json()["prompt"]


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_completion_return_token_ids(default_server: ServerProcess) -> None:
    body = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    out = complete(default_server, FRANCE_PROMPT, **body)
    choice = out["choices"][0]
    assert choice["prompt_token_ids"] == _tokenize(default_server, prompt=FRANCE_PROMPT)
    assert len(choice["token_ids"]) == out["usage"]["completion_tokens"] == 5
    assert _detokenize(default_server, choice["token_ids"]) == choice["text"]

    chunks = stream_chunks(default_server, "completions", {"prompt": FRANCE_PROMPT, **body})
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    # As vLLM: the prompt's ids on the first chunk only, each chunk's own new ids after that.
    assert choices[0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert all(c["prompt_token_ids"] is None for c in choices[1:])
    assert [t for c in choices for t in c["token_ids"]] == choice["token_ids"]


def test_chat_return_token_ids(default_server: ServerProcess) -> None:
    body = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    out = chat(default_server, FRANCE, **body)
    # vLLM puts the prompt's ids on the response (one prompt for all choices), the output's on the choice.
    assert out["prompt_token_ids"] == _tokenize(default_server, messages=FRANCE, add_generation_prompt=True)
    choice = out["choices"][0]
    assert len(choice["token_ids"]) == out["usage"]["completion_tokens"] == 5
    assert _detokenize(default_server, choice["token_ids"]) == choice["message"]["content"]

    chunks = stream_chunks(default_server, "chat/completions", {"messages": FRANCE, **body})
    assert chunks[0]["prompt_token_ids"] == out["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    streamed = [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]]
    assert streamed == choice["token_ids"]


def test_truncation_side_picks_the_end_that_is_kept(default_server: ServerProcess) -> None:
    full_ids = _tokenize(default_server, prompt=LONG_PROMPT)
    assert len(full_ids) > 8
    body = {"max_tokens": 4, "temperature": 0, "truncate_prompt_tokens": 8, "return_token_ids": True}
    left = complete(default_server, LONG_PROMPT, **body)  # the default: keep the last tokens
    assert left["choices"][0]["prompt_token_ids"] == full_ids[-8:]
    explicit_left = complete(default_server, LONG_PROMPT, truncation_side="left", **body)["choices"][0]
    assert (explicit_left["prompt_token_ids"], explicit_left["text"]) == (
        full_ids[-8:],
        left["choices"][0]["text"],
    )
    right = complete(default_server, LONG_PROMPT, truncation_side="right", **body)
    assert right["choices"][0]["prompt_token_ids"] == full_ids[:8]
    assert right["usage"]["prompt_tokens"] == 8
    by_ids = complete(default_server, full_ids[:8], max_tokens=4, temperature=0)
    assert right["choices"][0]["text"] == by_ids["choices"][0]["text"]

    chat_out = chat(default_server, FRANCE, truncation_side="right", **body)
    rendered = _tokenize(default_server, messages=FRANCE, add_generation_prompt=True)
    assert chat_out["prompt_token_ids"] == rendered[:8]

    response = httpx.post(
        f"{default_server.base_url}/v1/completions",
        json={"prompt": LONG_PROMPT, "truncate_prompt_tokens": 8, "truncation_side": "middle"},
        timeout=60,
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "truncation_side"


def test_return_tokens_as_token_ids(default_server: ServerProcess) -> None:
    body = {"max_tokens": 4, "temperature": 0, "return_token_ids": True, "return_tokens_as_token_ids": True}
    out = chat(default_server, FRANCE, logprobs=True, top_logprobs=3, **body)
    choice = out["choices"][0]
    entries = choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == [f"token_id:{t}" for t in choice["token_ids"]]
    for e in entries:
        assert len(e["top_logprobs"]) == 3
        assert all(t["token"].startswith("token_id:") and int(t["token"][9:]) >= 0 for t in e["top_logprobs"])
    # Greedy: the most likely alternative is the chosen token, with the same logprob.
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in entries)

    streamed = stream_chunks(
        default_server, "chat/completions", {"messages": FRANCE, "logprobs": True, **body}
    )
    streamed_tokens = [
        e["token"]
        for c in streamed
        if c["choices"] and c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert streamed_tokens == [e["token"] for e in entries]

    out = complete(default_server, FRANCE_PROMPT, logprobs=2, **body)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(all(key.startswith("token_id:") for key in top) for top in lp["top_logprobs"])
    # The text itself stays text, and offsets still count its characters.
    assert lp["text_offset"][0] == 0 and lp["text_offset"][-1] < len(choice["text"])


def test_extension_fields_are_null_where_vllm_puts_them(default_server: ServerProcess) -> None:
    client = _client(default_server)
    completion = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=FRANCE_PROMPT, max_tokens=2)
    choice = completion.choices[0]
    # Read through the openai SDK as vLLM clients do: a missing field would raise AttributeError.
    assert choice.prompt_logprobs is None  # type: ignore[attr-defined]
    assert choice.prompt_token_ids is None  # type: ignore[attr-defined]
    assert choice.token_ids is None  # type: ignore[attr-defined]
    assert choice.stop_reason is None  # type: ignore[attr-defined]
    assert completion.kv_transfer_params is None  # type: ignore[attr-defined]
    assert completion.system_fingerprint is None and completion.service_tier is None

    answer = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=FRANCE, max_tokens=2)  # type: ignore[arg-type]
    assert answer.prompt_logprobs is None  # type: ignore[attr-defined]
    assert answer.prompt_token_ids is None  # type: ignore[attr-defined]
    assert answer.kv_transfer_params is None  # type: ignore[attr-defined]
    assert answer.choices[0].stop_reason is None  # type: ignore[attr-defined]
    assert answer.choices[0].token_ids is None  # type: ignore[attr-defined]
    message = answer.choices[0].message
    assert message.refusal is None and message.audio is None and message.function_call is None
    assert message.reasoning_content is None  # type: ignore[attr-defined]

    # And when asked for, the same fields carry values.
    asked = complete(default_server, FRANCE_PROMPT, max_tokens=1, prompt_logprobs=0)
    assert asked["choices"][0]["prompt_logprobs"][0] is None
    assert len(asked["choices"][0]["prompt_logprobs"]) == len(_tokenize(default_server, prompt=FRANCE_PROMPT))


def test_chat_echo_repeats_the_continued_assistant_prefix(default_server: ServerProcess) -> None:
    body = {"max_tokens": 5, "temperature": 0, "continue_final_message": True, "add_generation_prompt": False}
    plain = chat(default_server, PREFILL, **body)["choices"][0]["message"]["content"]
    echoed = chat(default_server, PREFILL, echo=True, **body)["choices"][0]["message"]["content"]
    assert echoed == "Hello, my" + plain

    chunks = stream_chunks(default_server, "chat/completions", {"messages": PREFILL, "echo": True, **body})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"content": "Hello, my"}  # the prefix, before any generated text
    assert "".join(d.get("content") or "" for d in deltas) == echoed

    # A new assistant turn after a user message has nothing to echo.
    assert (
        chat(default_server, FRANCE, echo=True, max_tokens=3, temperature=0)["choices"][0]["message"][
            "content"
        ]
        == chat(default_server, FRANCE, max_tokens=3, temperature=0)["choices"][0]["message"]["content"]
    )


def test_completion_top_logprobs_put_the_sampled_token_first(default_server: ServerProcess) -> None:
    out = complete(default_server, FRANCE_PROMPT, max_tokens=16, temperature=1.0, seed=7, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    not_top = 0
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        first_token, first_value = next(iter(top.items()))
        assert (first_token, first_value) == (token, value)
        assert 2 <= len(top) <= 3  # the sampled token and the 2 most likely ones, each once
        others = list(top.values())[1:]
        assert others == sorted(others, reverse=True)
        not_top += value < max(top.values())
    assert not_top > 0  # at temperature 1 some sampled tokens are not the most likely one


def test_continuous_usage_counts_start_at_zero_and_grow(default_server: ServerProcess) -> None:
    usage_options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream_options": usage_options}
    chunks = stream_chunks(default_server, "chat/completions", {"messages": FRANCE, **body})
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts[0] == 0  # the role-only first chunk
    assert all(a < b for a, b in zip(counts[:-1], counts[1:-1], strict=False)), counts
    assert counts[-2] == counts[-1] == 6  # the final usage chunk repeats the total
    assert all(
        c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + n
        for c, n in zip(chunks, counts, strict=True)
    )

    chunks = stream_chunks(default_server, "completions", {"prompt": FRANCE_PROMPT, **body})
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(set(counts)) and counts[0] >= 1 and counts[-1] == 6
