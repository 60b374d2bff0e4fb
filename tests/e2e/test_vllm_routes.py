"""vLLM's extra routes on the shared default server (issue 16 items 7 and 11): OpenAI's retrieve-model
call, SageMaker's /invocations and /ping, and /tokenizer_info (the default server enables it)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import ServerProcess


def test_retrieve_model_and_unknown_model_is_a_404(default_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve(DEFAULT_MODEL_NAME)
    assert model.id == DEFAULT_MODEL_NAME and model.object == "model" and model.owned_by == "tandem"
    listed = httpx.get(f"{default_server.base_url}/v1/models", timeout=30).json()["data"][0]
    fetched = httpx.get(f"{default_server.base_url}/v1/models/{DEFAULT_MODEL_NAME}", timeout=30).json()
    assert {k: v for k, v in fetched.items() if k != "created"} == {
        k: v for k, v in listed.items() if k != "created"
    }
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # Ids with slashes (org/model) reach the handler too, and get the OpenAI envelope.
    missing = httpx.get(f"{default_server.base_url}/v1/models/org/no-such-model", timeout=30)
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {
            "message": "The model `org/no-such-model` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_invocations_route_by_body_shape(default_server: ServerProcess) -> None:
    url = f"{default_server.base_url}/invocations"
    chat_body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 5,
        "temperature": 0,
    }
    chat = httpx.post(url, json=chat_body, timeout=120)
    assert chat.status_code == 200, chat.text
    direct = httpx.post(f"{default_server.base_url}/v1/chat/completions", json=chat_body, timeout=120)
    assert chat.json()["object"] == "chat.completion"
    assert chat.json()["choices"][0]["message"] == direct.json()["choices"][0]["message"]
    completion = httpx.post(url, json={"prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0}, timeout=120)
    assert completion.status_code == 200, completion.text
    assert completion.json()["object"] == "text_completion" and completion.json()["choices"][0]["text"]
    # Streaming goes through too.
    with httpx.stream("POST", url, json={**chat_body, "stream": True}, timeout=120) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "chat.completion.chunk"
    # A matched kind validates as its own endpoint does: the bad field is named.
    bad = httpx.post(url, json={**chat_body, "temperature": -1}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    for body in ({"foo": 1}, [1, 2]):
        unknown = httpx.post(url, json=body, timeout=60)
        assert unknown.status_code == 400
        assert unknown.json()["error"]["message"] == (
            "Cannot find suitable handler for request. Expected one of: "
            "[ChatCompletionRequest, CompletionRequest]"
        )
    broken = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=60)
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{default_server.base_url}/ping", timeout=30).status_code == 200


def test_tokenizer_info(default_server: ServerProcess) -> None:
    info = httpx.get(f"{default_server.base_url}/tokenizer_info", timeout=30).json()
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"].startswith("{%")
    assert (
        info["model_max_length"]
        == httpx.get(f"{default_server.base_url}/v1/models").json()["data"][0]["max_model_len"]
    )
    assert info["added_tokens_decoder"]["2"]["content"] == "<|im_end|>"
    assert info["added_tokens_decoder"]["2"]["special"] is True
    # The ids it names are the ones /tokenize produces.
    tokens = httpx.post(
        f"{default_server.base_url}/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False}
    ).json()["tokens"]
    assert tokens == [2]
