"""Issue 4 acceptance: every sampling parameter changes the real default model's output as it should."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
FRANCE_PROMPT = "The capital of France is"


def post(server: ServerProcess, route: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(
        f"{server.base_url}/v1/{route}", json={"model": DEFAULT_MODEL_NAME, **body}, timeout=180
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def chat(server: ServerProcess, messages: list[dict[str, str]], **body: Any) -> dict[str, Any]:
    return post(server, "chat/completions", {"messages": messages, **body})


def complete(server: ServerProcess, prompt: Any, **body: Any) -> dict[str, Any]:
    return post(server, "completions", {"prompt": prompt, **body})


def stream_chunks(server: ServerProcess, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    payload = {"model": DEFAULT_MODEL_NAME, "stream": True, **body}
    with httpx.stream("POST", f"{server.base_url}/v1/{route}", json=payload, timeout=180) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        chunks.append(chunk)
    return chunks


def token_ids_of(server: ServerProcess, text: str) -> list[int]:
    """The token ids of `text`, read from prompt logprobs (with 0 alternatives each position holds just
    the prompt token's id). A leading newline, always a token of its own, lets the first token show too."""
    out = complete(server, "\n" + text, max_tokens=1, prompt_logprobs=0)
    positions = out["choices"][0]["prompt_logprobs"][1:]
    assert all(len(p) == 1 for p in positions)
    return [int(next(iter(p))) for p in positions]


def token_id_of(server: ServerProcess, word: str) -> int:
    (token_id,) = token_ids_of(server, word)
    return token_id


def text_of(response: dict[str, Any], index: int = 0) -> str:
    choice = response["choices"][index]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_top_k_one_equals_greedy(default_server: ServerProcess) -> None:
    greedy = text_of(chat(default_server, POEM, temperature=0, max_tokens=16))
    assert text_of(chat(default_server, POEM, temperature=1.5, top_k=1, max_tokens=16)) == greedy
    # The same temperature without the cut really samples: some seed leaves the greedy path.
    samples = [text_of(chat(default_server, POEM, temperature=1.5, max_tokens=16, seed=s)) for s in range(3)]
    assert any(s != greedy for s in samples)


def test_logit_bias_of_plus_100_forces_a_token(default_server: ServerProcess) -> None:
    token_id = 1000
    # A one-token prompt given as ids, echoed with logprobs, shows that token's text.
    echoed = complete(default_server, [token_id], echo=True, max_tokens=1, temperature=0, logprobs=0)
    token = echoed["choices"][0]["logprobs"]["tokens"][0]
    assert token and token != " Paris"
    out = complete(
        default_server, FRANCE_PROMPT, max_tokens=4, temperature=1.0, logit_bias={str(token_id): 100}
    )
    assert text_of(out) == token * 4


def test_logit_bias_of_minus_100_bans_the_greedy_token(default_server: ServerProcess) -> None:
    paris = token_id_of(default_server, " Paris")
    assert text_of(complete(default_server, FRANCE_PROMPT, max_tokens=1, temperature=0)) == " Paris"
    banned = complete(
        default_server, FRANCE_PROMPT, max_tokens=1, temperature=0, logit_bias={str(paris): -100}
    )
    assert text_of(banned) not in ("", " Paris")


def test_seed_is_reproducible_alone_and_among_31_concurrent_requests(default_server: ServerProcess) -> None:
    seeded = {"prompt": "Once upon a time", "temperature": 1.0, "seed": 1234, "max_tokens": 8}
    alone = text_of(complete(default_server, **seeded))
    again = text_of(complete(default_server, **seeded))
    assert again == alone

    async def run_all() -> list[str]:
        url = f"{default_server.base_url}/v1/completions"
        bodies = [{"prompt": f"Story number {i}:", "temperature": 1.0, "max_tokens": 8} for i in range(32)]
        for position in (0, 13, 31):  # the seeded request three times among 29 unseeded ones
            bodies[position] = seeded
        async with httpx.AsyncClient(timeout=300) as client:
            resps = await asyncio.gather(
                *[client.post(url, json={"model": DEFAULT_MODEL_NAME, **b}) for b in bodies]
            )
        return [text_of(r.json()) for r in resps]

    texts = asyncio.run(run_all())
    assert [texts[0], texts[13], texts[31]] == [alone] * 3
    # Other seeds give other samples, so the match above is the seed's doing.
    others = {text_of(complete(default_server, **{**seeded, "seed": s})) for s in (1, 2, 3)}
    assert others != {alone}


def _boundary_stop(tokens: list[str], offsets: list[int], text: str) -> tuple[str, int]:
    """A 4-character stop string across a token boundary, first found at the returned position."""
    for i in range(1, len(tokens)):
        boundary = offsets[i]
        if len(tokens[i - 1]) >= 2 and len(tokens[i]) >= 2:
            stop = text[boundary - 2 : boundary + 2]
            if text.find(stop) == boundary - 2 and stop.strip() == stop:
                return stop, boundary - 2
    raise AssertionError(f"no usable token boundary in {tokens}")


def test_stop_strings_that_span_tokens(default_server: ServerProcess) -> None:
    base = {"temperature": 0, "max_tokens": 24}
    full = complete(default_server, FRANCE_PROMPT, logprobs=0, **base)["choices"][0]
    stop, at = _boundary_stop(full["logprobs"]["tokens"], full["logprobs"]["text_offset"], full["text"])
    cut = complete(default_server, FRANCE_PROMPT, stop=[stop], **base)["choices"][0]
    assert cut["text"] == full["text"][:at]
    assert cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == stop
    kept = complete(default_server, FRANCE_PROMPT, stop=stop, include_stop_str_in_output=True, **base)
    assert text_of(kept) == full["text"][: at + len(stop)]
    # Streaming holds back a partial match and ends the same way, finish_reason on the last content chunk.
    chunks = stream_chunks(default_server, "completions", {"prompt": FRANCE_PROMPT, "stop": [stop], **base})
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"][:at]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_min_tokens_suppresses_eos(default_server: ServerProcess) -> None:
    free = chat(default_server, FRANCE, temperature=0, max_tokens=48)
    assert free["choices"][0]["finish_reason"] == "stop"  # the model ends with EOS by itself
    natural = free["usage"]["completion_tokens"]
    assert natural < 30
    forced = chat(default_server, FRANCE, temperature=0, max_tokens=48, min_tokens=natural + 10)
    assert forced["usage"]["completion_tokens"] >= natural + 10
    assert len(text_of(forced)) > len(text_of(free))


def test_stop_token_ids_and_ignore_eos(default_server: ServerProcess) -> None:
    paris = token_id_of(default_server, " Paris")
    stopped = complete(default_server, FRANCE_PROMPT, temperature=0, max_tokens=8, stop_token_ids=[paris])
    choice = stopped["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"], choice["text"]) == ("stop", paris, "")
    assert stopped["usage"]["completion_tokens"] == 1
    kept = complete(
        default_server,
        FRANCE_PROMPT,
        temperature=0,
        max_tokens=8,
        stop_token_ids=[paris],
        include_stop_str_in_output=True,
    )
    assert text_of(kept) == " Paris"
    endless = chat(default_server, FRANCE, temperature=0, max_tokens=40, ignore_eos=True)
    assert endless["usage"]["completion_tokens"] == 40
    assert endless["choices"][0]["finish_reason"] == "length"


def test_max_tokens_and_max_completion_tokens(default_server: ServerProcess) -> None:
    short = chat(default_server, POEM, temperature=0, max_completion_tokens=3, max_tokens=9)
    assert short["usage"]["completion_tokens"] == 3  # the newer name wins
    assert short["choices"][0]["finish_reason"] == "length"
    assert complete(default_server, FRANCE_PROMPT, temperature=0)["usage"]["completion_tokens"] == 16


def _num_repeats(tokens: list[str]) -> int:
    return len(tokens) - len(set(tokens))


def test_penalties_lower_repetition_counts(default_server: ServerProcess) -> None:
    prompt = "Repeat after me: hello hello hello"
    base = {"temperature": 0, "max_tokens": 24, "logprobs": 0}

    def repeats(**penalty: float) -> int:
        out = complete(default_server, prompt, **base, **penalty)
        return _num_repeats(out["choices"][0]["logprobs"]["tokens"])

    plain = repeats()
    assert plain >= 20  # greedy decoding just repeats the word
    assert repeats(frequency_penalty=1.0) < plain
    assert repeats(presence_penalty=2.0) < plain
    assert repeats(repetition_penalty=1.5) < plain
    # Negative penalties encourage repetition instead: never fewer repeats than greedy.
    assert repeats(frequency_penalty=-1.0) >= plain


def test_n_4_at_temperature_1_returns_4_distinct_choices(default_server: ServerProcess) -> None:
    body = {"n": 4, "temperature": 1.0, "max_tokens": 8, "seed": 5}
    out = chat(default_server, POEM, **body)
    assert sorted(c["index"] for c in out["choices"]) == [0, 1, 2, 3]
    assert 4 <= out["usage"]["completion_tokens"] <= 32
    texts = [text_of(out, i) for i in range(4)]
    assert len(set(texts)) >= 2  # independent samples (seed + i each), not one sample copied
    # The seed makes the whole set reproducible.
    again = chat(default_server, POEM, **body)
    assert [text_of(again, i) for i in range(4)] == texts


def test_completion_prompt_shapes_are_indexed_prompt_major(default_server: ServerProcess) -> None:
    prompts = ["The capital of France is", "Water is made of"]
    base = {"temperature": 0, "max_tokens": 3, "echo": True, "n": 2}
    out = complete(default_server, prompts, **base)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for choice in out["choices"]:
        assert choice["text"].startswith(prompts[choice["index"] // 2])  # index = prompt * n + sample
    single = complete(default_server, prompts[0], temperature=0, max_tokens=3)
    assert (
        out["usage"]["prompt_tokens"]
        == single["usage"]["prompt_tokens"]
        + complete(default_server, prompts[1], temperature=0, max_tokens=3)["usage"]["prompt_tokens"]
    )
    # The same prompts as token ids give the same greedy text.
    ids = [token_ids_of(default_server, text) for text in prompts]
    by_ids = complete(default_server, ids, temperature=0, max_tokens=3)
    by_text = complete(default_server, prompts, temperature=0, max_tokens=3)
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    one_list = complete(default_server, ids[1], temperature=0, max_tokens=3)
    assert [c["index"] for c in one_list["choices"]] == [0]
    assert text_of(one_list) == by_text["choices"][1]["text"]


def test_stream_usage_options(default_server: ServerProcess) -> None:
    body = {"messages": FRANCE, "temperature": 0, "max_tokens": 6}
    plain = stream_chunks(default_server, "chat/completions", body)
    assert all("usage" not in c for c in plain)
    with_usage = stream_chunks(
        default_server, "chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    last = with_usage[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 6
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 6
    assert all(c["usage"] is None for c in with_usage[:-1])
    content = [c for c in with_usage[:-1] if c["choices"][0]["delta"].get("content")]
    assert content[-1]["choices"][0]["finish_reason"] == "length"  # the last content chunk carries it
    continuous = stream_chunks(
        default_server,
        "chat/completions",
        {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    counts = [c["usage"]["completion_tokens"] for c in continuous]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] < 6
