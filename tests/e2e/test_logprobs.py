"""Issue 4 acceptance: logprobs in OpenAI's chat and completions formats, prompt logprobs and echo."""

from __future__ import annotations

import math
from typing import Any

from tests.e2e.test_sampling_params import FRANCE, FRANCE_PROMPT, POEM, chat, complete, stream_chunks
from tests.server_process import ServerProcess

TOLERANCE = 2e-3  # batch shapes differ between requests; float32 logits still agree this closely


def test_chat_logprobs_format_and_consistency(default_server: ServerProcess) -> None:
    out = chat(default_server, POEM, temperature=0, max_tokens=8, logprobs=True, top_logprobs=20)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"  # so every token is text (an ending EOS shows no text)
    entries = choice["logprobs"]["content"]
    assert len(entries) == out["usage"]["completion_tokens"] == 8
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    for e in entries:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(e["bytes"]).decode("utf-8", errors="replace") == e["token"]
        top = e["top_logprobs"]
        assert len(top) == 20
        assert all(set(t) == {"token", "logprob", "bytes"} for t in top)
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-4
        # Greedy: the chosen token is the most likely one, with the same logprob.
        assert (top[0]["token"], top[0]["logprob"]) == (e["token"], e["logprob"])


def test_sampled_token_logprob_matches_its_top_logprobs_entry(default_server: ServerProcess) -> None:
    out = chat(
        default_server, FRANCE, temperature=1.0, seed=11, max_tokens=12, logprobs=True, top_logprobs=20
    )
    found = 0
    for e in out["choices"][0]["logprobs"]["content"]:
        assert e["logprob"] <= 0
        same = [t for t in e["top_logprobs"] if t["token"] == e["token"]]
        if same:
            found += 1
            assert math.isclose(same[0]["logprob"], e["logprob"], abs_tol=1e-6)
        else:  # outside the top 20: less likely than all of them
            assert e["logprob"] <= e["top_logprobs"][-1]["logprob"]
    assert found > 0


def test_chat_logprobs_without_top_logprobs(default_server: ServerProcess) -> None:
    out = chat(default_server, FRANCE, temperature=0, max_tokens=3, logprobs=True)
    assert all(e["top_logprobs"] == [] for e in out["choices"][0]["logprobs"]["content"])
    assert chat(default_server, FRANCE, temperature=0, max_tokens=3)["choices"][0]["logprobs"] is None


def test_streamed_chat_logprobs_equal_the_non_streamed_ones(default_server: ServerProcess) -> None:
    body = {"messages": FRANCE, "temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    full = chat(default_server, FRANCE, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    chunks = stream_chunks(default_server, "chat/completions", body)
    streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    expected = full["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in streamed] == [e["token"] for e in expected]
    assert all(
        math.isclose(a["logprob"], b["logprob"], abs_tol=TOLERANCE)
        for a, b in zip(streamed, expected, strict=True)
    )


def _check_completion_logprobs(lp: dict[str, Any], text: str, k: int) -> None:
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(lp["tokens"]) == text
    offsets = lp["text_offset"]
    assert offsets == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        if value is None:
            assert top is None
            continue
        assert value <= 0
        assert token in top and math.isclose(top[token], value, abs_tol=1e-6)  # the chosen token is included
        assert k <= len(top) <= k + 1


def test_completion_logprobs_format(default_server: ServerProcess) -> None:
    out = complete(default_server, FRANCE_PROMPT, temperature=0, max_tokens=6, logprobs=3)
    choice = out["choices"][0]
    _check_completion_logprobs(choice["logprobs"], choice["text"], 3)
    first_top = choice["logprobs"]["top_logprobs"][0]
    assert max(first_top, key=first_top.get) == choice["logprobs"]["tokens"][0]  # greedy = rank 1
    # Streaming yields the same tokens and logprobs, and offsets that continue across chunks.
    chunks = stream_chunks(
        default_server,
        "completions",
        {"prompt": FRANCE_PROMPT, "temperature": 0, "max_tokens": 6, "logprobs": 3},
    )
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in merged:
            merged[key] += c["choices"][0]["logprobs"][key]
    assert merged["tokens"] == choice["logprobs"]["tokens"]
    assert merged["text_offset"] == choice["logprobs"]["text_offset"]
    for a, b in zip(merged["token_logprobs"], choice["logprobs"]["token_logprobs"], strict=True):
        assert math.isclose(a, b, abs_tol=TOLERANCE)


def test_echo_with_logprobs_puts_the_prompt_tokens_first(default_server: ServerProcess) -> None:
    generated = complete(default_server, FRANCE_PROMPT, temperature=0, max_tokens=2, logprobs=1)["choices"][0]
    assert generated["text"] == " Paris."
    # The prompt extended by the generated text: its last two prompt logprobs are the generated ones.
    prompt = FRANCE_PROMPT + generated["text"]
    out = complete(default_server, prompt, temperature=0, max_tokens=1, logprobs=1, echo=True)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt)
    _check_completion_logprobs(lp, choice["text"], 1)
    num_prompt = out["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == num_prompt + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"][:num_prompt]) == prompt
    for echoed, sampled in zip(
        lp["token_logprobs"][num_prompt - 2 : num_prompt],
        generated["logprobs"]["token_logprobs"],
        strict=True,
    ):
        assert math.isclose(echoed, sampled, abs_tol=TOLERANCE)
    # Streaming: the first chunk carries the echoed prompt with its logprobs.
    chunks = stream_chunks(
        default_server,
        "completions",
        {"prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True},
    )
    first = chunks[0]["choices"][0]
    assert first["text"].startswith(prompt)
    assert first["logprobs"]["tokens"][:num_prompt] == lp["tokens"][:num_prompt]
    assert first["logprobs"]["token_logprobs"][0] is None


def test_prompt_logprobs_on_completions_and_chat(default_server: ServerProcess) -> None:
    out = complete(default_server, FRANCE_PROMPT + " Paris.", temperature=0, max_tokens=1, prompt_logprobs=2)
    positions = out["choices"][0]["prompt_logprobs"]
    assert len(positions) == out["usage"]["prompt_tokens"]
    assert positions[0] is None
    for position in positions[1:]:
        assert 1 <= len(position) <= 3  # the prompt token and the top 2
        ranks = sorted(v["rank"] for v in position.values())
        assert ranks[0] >= 1
        for entry in position.values():
            assert set(entry) == {"logprob", "rank", "decoded_token"}
            assert entry["logprob"] <= 0
    # " Paris" after "The capital of France is" is the model's first choice.
    assert [v for v in positions[-2].values() if v["decoded_token"] == " Paris"][0]["rank"] == 1
    reply = chat(default_server, FRANCE, temperature=0, max_tokens=1, prompt_logprobs=0)
    chat_positions = reply["prompt_logprobs"]
    assert len(chat_positions) == reply["usage"]["prompt_tokens"]
    assert chat_positions[0] is None and all(len(p) == 1 for p in chat_positions[1:])
    # Not asked for: present as null, where vLLM puts it (issue 16).
    assert chat(default_server, FRANCE, temperature=0, max_tokens=1)["prompt_logprobs"] is None
