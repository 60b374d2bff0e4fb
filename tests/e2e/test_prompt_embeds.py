"""Prompt embeddings (`--enable-prompt-embeds`, on in the shared server): rows from the model's own
embedding table give exactly the text prompt's greedy output; bad payloads are 400s, and a pickle that
would run code is refused without running it."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_process import ServerProcess

GREEDY = {"max_tokens": 10, "temperature": 0}
HIDDEN_SIZE = 576


@pytest.fixture(scope="module")
def embed_table() -> torch.Tensor:
    """The default model's token embedding table, loaded in this process from the same GGUF."""
    from engine.loader import load_model

    model = load_model(None, dtype="float32").model  # the shared test server runs float32
    with torch.no_grad():
        return model.embed_input_ids(torch.arange(model.arch.vocab_size))  # [V, H]


def _b64(obj: object) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


def _tokens(server: ServerProcess, **body: object) -> list[int]:
    return httpx.post(f"{server.base_url}/tokenize", json=body, timeout=60).json()["tokens"]


def _post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=300)


def test_completion_from_table_rows_equals_text_prompt(
    default_server: ServerProcess, embed_table: torch.Tensor
) -> None:
    text = "The capital of France is"
    ids = _tokens(default_server, prompt=text)
    rows = embed_table[ids]
    by_text = _post(default_server, "/v1/completions", {"prompt": text, **GREEDY}).json()
    by_embeds = _post(default_server, "/v1/completions", {"prompt_embeds": _b64(rows), **GREEDY}).json()
    assert by_embeds["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_embeds["usage"]["prompt_tokens"] == len(ids)
    # A leading batch dimension of 1 is accepted, and a list gives one choice per tensor.
    both = _post(
        default_server,
        "/v1/completions",
        {"prompt_embeds": [_b64(rows[None]), _b64(embed_table[ids[:3]])], **GREEDY},
    ).json()
    assert both["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert len(both["choices"]) == 2


def test_chat_mixing_text_and_embedding_parts_equals_text_chat(
    default_server: ServerProcess, embed_table: torch.Tensor
) -> None:
    # Text parts are joined with newlines (as vLLM does), so the text-only chat spells the same joins;
    # each embedded piece starts after a newline and ends before <|im_end|>: token boundaries both.
    text_chat = [
        {"role": "system", "content": "You are a geography\ntutor."},
        {"role": "user", "content": "Question: what is the\ncapital of Italy?"},
    ]
    tutor_ids = _tokens(default_server, prompt="tutor.")
    italy_ids = _tokens(default_server, prompt="capital of Italy?")
    mixed_chat = [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "You are a geography"},
                {"type": "prompt_embeds", "data": _b64(embed_table[tutor_ids])},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Question: what is the"},
                {"type": "prompt_embeds", "data": _b64(embed_table[italy_ids])},
            ],
        },
    ]
    rendered = _tokens(default_server, messages=text_chat)
    assert _contains(rendered, tutor_ids) and _contains(rendered, italy_ids)
    by_text = _post(default_server, "/v1/chat/completions", {"messages": text_chat, **GREEDY}).json()
    by_embeds = _post(default_server, "/v1/chat/completions", {"messages": mixed_chat, **GREEDY}).json()
    assert by_embeds["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == len(rendered)
    assert by_embeds["choices"][0]["message"]["content"] == by_text["choices"][0]["message"]["content"]


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


class _WritesMarker:
    """Unpickling this would call open(marker, "w"): code a weights_only load must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


BAD_PAYLOADS = {
    "bad base64": lambda _m: "not base64 at all!",
    "not a torch file": lambda _m: base64.b64encode(b"plain bytes").decode(),
    "wrong rank 1-D": lambda _m: _b64(torch.zeros(HIDDEN_SIZE)),
    "wrong rank 3-D": lambda _m: _b64(torch.zeros(2, 3, HIDDEN_SIZE)),
    "wrong hidden size": lambda _m: _b64(torch.zeros(3, HIDDEN_SIZE + 1)),
    "NaN": lambda _m: _b64(torch.full((3, HIDDEN_SIZE), float("nan"))),
    "infinite": lambda _m: _b64(torch.full((3, HIDDEN_SIZE), float("inf"))),
    "integer tensor": lambda _m: _b64(torch.zeros(3, HIDDEN_SIZE, dtype=torch.int64)),
    "not a tensor": lambda _m: _b64({"rows": [1.0, 2.0]}),
    # A 4 KB view of 460 MB: refused from its shape, before any row is materialized.
    "expanded past the context": lambda _m: _b64(torch.zeros(1, HIDDEN_SIZE).expand(200_000, HIDDEN_SIZE)),
    "requires grad": lambda _m: _b64(torch.zeros(3, HIDDEN_SIZE, requires_grad=True)),
    "nn.Parameter": lambda _m: _b64(torch.nn.Parameter(torch.zeros(3, HIDDEN_SIZE))),
    "float8": lambda _m: _b64(torch.zeros(3, HIDDEN_SIZE, dtype=torch.float8_e4m3fn)),
    "finite float64, inf in float32": lambda _m: _b64(
        torch.full((3, HIDDEN_SIZE), 1e300, dtype=torch.float64)
    ),
    "pickle with code": lambda m: _b64(_WritesMarker(m)),
}


@pytest.mark.parametrize("kind", list(BAD_PAYLOADS))
def test_bad_payloads_are_400(default_server: ServerProcess, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    data = BAD_PAYLOADS[kind](marker)
    completion = _post(default_server, "/v1/completions", {"prompt_embeds": data, "max_tokens": 2})
    chat = _post(
        default_server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": data}]}],
            "max_tokens": 2,
        },
    )
    assert completion.status_code == 400, completion.text
    assert chat.status_code == 400, chat.text
    assert completion.json()["error"]["param"] == "prompt_embeds"
    assert not marker.exists()
    assert not os.path.exists(marker)


def test_pickle_payload_would_run_code_if_loaded_unsafely(tmp_path: Path) -> None:
    """Proves the payload above is a real threat, so its 400 is meaningful."""
    marker = tmp_path / "pwned"
    raw = base64.b64decode(_b64(_WritesMarker(marker)))
    torch.load(io.BytesIO(raw), weights_only=False)
    assert marker.exists()


def test_prompt_logprobs_are_refused_and_an_empty_list_is_ignored(
    default_server: ServerProcess, embed_table: torch.Tensor
) -> None:
    """vLLM's behaviour: embedding positions have no token to score; `prompt_embeds: []` is no input."""
    data = _b64(embed_table[_tokens(default_server, prompt="Hello there")])
    completion = _post(
        default_server, "/v1/completions", {"prompt_embeds": data, "prompt_logprobs": 1, **GREEDY}
    )
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt_logprobs"
    parts = [{"type": "prompt_embeds", "data": data}]
    chat = _post(
        default_server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": parts}], "prompt_logprobs": 0, **GREEDY},
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "prompt_logprobs"
    text = {"prompt": "The capital of France is", **GREEDY}
    with_empty = _post(default_server, "/v1/completions", {**text, "prompt_embeds": []})
    assert with_empty.status_code == 200, with_empty.text
    plain = _post(default_server, "/v1/completions", text).json()
    assert with_empty.json()["choices"][0]["text"] == plain["choices"][0]["text"]
    assert len(with_empty.json()["choices"]) == 1
