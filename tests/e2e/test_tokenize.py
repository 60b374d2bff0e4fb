"""POST /tokenize and /detokenize on the default model: counts agree with what generation bills."""

from __future__ import annotations

import httpx

from tests.server_process import ServerProcess

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=120)


def test_tokenize_prompt_matches_completion_usage_and_round_trips(default_server: ServerProcess) -> None:
    text = "Tandem tokenizes text: 123, héllo!"
    tok = _post(default_server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    completion = _post(default_server, "/v1/completions", {"prompt": text, "max_tokens": 1}).json()
    assert tok["count"] == len(tok["tokens"]) == completion["usage"]["prompt_tokens"]
    assert tok["max_model_len"] > tok["count"]
    assert len(tok["token_strs"]) == tok["count"] and tok["token_strs"][0] == "T"
    back = _post(default_server, "/detokenize", {"tokens": tok["tokens"]}).json()
    assert back == {"prompt": text}
    # Without return_token_strs the field is null, as vLLM answers.
    assert _post(default_server, "/tokenize", {"prompt": text}).json()["token_strs"] is None


def test_tokenize_chat_applies_the_template(default_server: ServerProcess) -> None:
    tok = _post(default_server, "/tokenize", {"messages": CHAT}).json()
    chat = _post(default_server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}).json()
    assert tok["count"] == chat["usage"]["prompt_tokens"]
    rendered = _post(default_server, "/detokenize", {"tokens": tok["tokens"]}).json()["prompt"]
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")
    no_prompt = _post(default_server, "/tokenize", {"messages": CHAT, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == tok["tokens"][: no_prompt["count"]] and no_prompt["count"] < tok["count"]


def test_tokenize_and_detokenize_errors(default_server: ServerProcess) -> None:
    both = _post(default_server, "/tokenize", {"prompt": "a", "messages": CHAT})
    neither = _post(default_server, "/tokenize", {})
    bad_id = _post(default_server, "/detokenize", {"tokens": [1, 10**9]})
    bad_model = _post(default_server, "/tokenize", {"prompt": "a", "model": "nope"})
    bad_role = _post(default_server, "/tokenize", {"messages": [{"role": "robot", "content": "x"}]})
    assert [r.status_code for r in (both, neither, bad_id, bad_model, bad_role)] == [400, 400, 400, 404, 400]
    assert bad_id.json()["error"]["param"] == "tokens"
    assert "vocabulary" in bad_id.json()["error"]["message"]
