"""Greedy output of the served default model equals transformers' greedy generate on the same GGUF."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "¿Cuál es tu color favorito? Answer in English.",
]
NUM_TOKENS = 32


@pytest.mark.parametrize("question", CHATS)
def test_greedy_chat_tokens_match_transformers(
    default_server: ServerProcess, hf_gguf_oracle: tuple[Any, Any], question: str
) -> None:
    model, tokenizer = hf_gguf_oracle
    messages = [{"role": "user", "content": question}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=NUM_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    expected_ids = generated[0, len(prompt_ids) :].tolist()
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": messages,
        "temperature": 0,
        "max_tokens": NUM_TOKENS,
        "logprobs": True,
    }
    resp = httpx.post(f"{default_server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    # Token for token: the served tokens (as their byte strings) are transformers' tokens.
    served_bytes = [bytes(entry["bytes"]) for entry in choice["logprobs"]["content"]]
    expected_bytes = [
        tokenizer.convert_tokens_to_string([t]).encode()
        for t in tokenizer.convert_ids_to_tokens(expected_ids)
    ]
    assert served_bytes == expected_bytes  # EOS included, as the engine counts it like vLLM
    assert resp.json()["usage"]["completion_tokens"] == len(expected_ids)
    assert choice["message"]["content"] == tokenizer.decode(expected_ids, skip_special_tokens=True)
