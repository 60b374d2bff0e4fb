"""LoRA through a real `tandem serve --enable-lora --lora-modules ...` (engine and API processes, HTTP):
a completion whose `model` names an adapter equals the peft-merged model's greedy tokens, the base model
is unchanged beside it, /v1/models lists the adapter under its parent, and adapters loaded and unloaded
at run time over HTTP (vLLM's endpoints) are served and then refused.

Needs both halves of issue 18: the engine (this file's branch) and the frontend that maps a request's
`model` to AddRequest.lora_name and serves the load/unload endpoints."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.engine.conftest import build_tiny_hf_model, write_tokenizer_files
from tests.engine.lora_adapters import make_peft_adapter, merged_model, reference_greedy
from tests.server_process import ServerProcess, serve

PROMPT = [11, 23, 35, 47, 59, 71, 83, 95]
MAX_TOKENS = 6
BASE_NAME = "tiny-base"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model_dir = tmp_path_factory.mktemp("tiny-lora-base")
    build_tiny_hf_model("llama").save_pretrained(model_dir)
    write_tokenizer_files(model_dir)
    adapters = tmp_path_factory.mktemp("adapters")
    return {
        "model": model_dir,
        "started": make_peft_adapter(build_tiny_hf_model("llama"), adapters / "started", seed=31, rank=8),
        "runtime": make_peft_adapter(build_tiny_hf_model("llama"), adapters / "runtime", seed=32, rank=4),
    }


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[ServerProcess]:
    args = [str(folders["model"]), "--served-model-name", BASE_NAME, "--dtype", "float32"]
    args += ["--enable-lora", "--lora-modules", f"started={folders['started']}", "--max-lora-rank", "8"]
    args += ["--max-loras", "2"]
    server = serve(args)
    yield server
    server.stop()


def complete(server: ServerProcess, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    body["return_token_ids"] = True
    return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)


def greedy_ids(server: ServerProcess, model: str) -> list[int]:
    response = complete(server, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_models_lists_the_adapter_under_its_parent(server: ServerProcess) -> None:
    models = {m["id"]: m for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]}
    assert models["started"]["parent"] == BASE_NAME
    assert models[BASE_NAME].get("parent") is None


def test_an_adapter_request_matches_the_merged_model(server: ServerProcess, folders: dict[str, Path]) -> None:
    expected = reference_greedy(merged_model(folders["model"], folders["started"]), PROMPT, MAX_TOKENS)
    base_expected = reference_greedy(build_tiny_hf_model("llama"), PROMPT, MAX_TOKENS)
    assert expected != base_expected  # the adapter matters, so the check below means something
    assert greedy_ids(server, "started") == expected
    assert greedy_ids(server, BASE_NAME) == base_expected


def test_unknown_models_are_404(server: ServerProcess) -> None:
    response = complete(server, "no-such-adapter")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_load_and_unload_at_run_time(server: ServerProcess, folders: dict[str, Path]) -> None:
    url = server.base_url
    body = {"lora_name": "runtime", "lora_path": str(folders["runtime"])}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=60).status_code == 200
    assert greedy_ids(server, "runtime") == reference_greedy(
        merged_model(folders["model"], folders["runtime"]), PROMPT, MAX_TOKENS
    )
    bad = httpx.post(
        f"{url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nowhere"}, timeout=60
    )
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    response = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "runtime"}, timeout=60)
    assert response.status_code == 200
    assert complete(server, "runtime").status_code == 404
    assert greedy_ids(server, "started") == reference_greedy(
        merged_model(folders["model"], folders["started"]), PROMPT, MAX_TOKENS
    )


def _stream_text(
    server: ServerProcess, model: str, max_tokens: int, first: threading.Event | None = None
) -> tuple[str, str | None]:
    """A streamed greedy completion: (its text, its finish reason); an error chunk fails the test.
    `first` is set when the first token arrives."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    text, finish = "", None
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            finish = chunk["choices"][0]["finish_reason"] or finish
            if first is not None:
                first.set()
    return text, finish


def test_streams_run_on_while_adapters_are_loaded_and_unloaded(
    server: ServerProcess, folders: dict[str, Path]
) -> None:
    # Issue 18: load/unload at run time while requests stream; none fails and none changes its output.
    max_tokens = 200  # long enough that every stream is still going when the first load arrives
    models = [BASE_NAME, "started"] * 3
    firsts = [threading.Event() for _ in models]
    body = {"lora_name": "during", "lora_path": str(folders["runtime"])}
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        streams = [
            pool.submit(_stream_text, server, model, max_tokens, first)
            for model, first in zip(models, firsts, strict=True)
        ]
        assert all(first.wait(60) for first in firsts)  # every stream is generating
        cycles = 0
        while cycles == 0 or not all(s.done() for s in streams):
            if cycles == 0:
                assert not any(s.done() for s in streams)
            load = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json=body, timeout=60)
            assert load.status_code == 200, load.text
            unload = httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "during"})
            assert unload.status_code == 200, unload.text
            cycles += 1
        results = [s.result() for s in streams]
    for model, (text, finish) in zip(models, results, strict=True):
        assert finish == "length"
        alone = _stream_text(server, model, max_tokens)  # the same request with nothing else going on
        assert text == alone[0], model
