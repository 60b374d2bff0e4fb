"""Issue 18 acceptance, many models behind one API tier: two engine workers of two different models (the
default SmolLM2 GGUF and a tiny random Llama folder served as "tiny") behind one `tandem api`, each
request answered by its own model; then one model's engine killed while the other keeps serving. And
`tandem serve --model-config` starting two models in one launch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import DEFAULT_MODEL_NAME
from tests.e2e.test_failures import ENGINE_FLAGS
from tests.e2e.test_scale_out import metric_samples, wait_for_engines
from tests.engine.conftest import build_tiny_hf_model, write_tokenizer_files
from tests.server_process import ServerProcess, free_port, serve

TINY = "tiny"
PROMPT = "The quick brown fox jumps over"
TINY_FLAGS = ["--kv-cache-memory", "64M", "--num-threads", "1", "--dtype", "float32"]


def tiny_folder(folder: Path, variant: str = "llama", seed: int = 0) -> Path:
    build_tiny_hf_model(variant, seed).save_pretrained(folder)
    write_tokenizer_files(folder)
    return folder


@dataclass
class TwoModels:
    addresses: list[str]
    engines: list[ServerProcess]
    api: ServerProcess
    tiny_dir: Path

    def post(self, path: str, body: dict, timeout: float = 120) -> httpx.Response:
        return httpx.post(f"{self.api.base_url}{path}", json=body, timeout=timeout)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoModels]:
    tiny_dir = tiny_folder(tmp_path_factory.mktemp("tiny-llama"))
    ports = [free_port(), free_port()]
    addresses = [f"tcp://127.0.0.1:{port}" for port in ports]
    engine_args = [
        ["engine", "--listen", addresses[0], "--engine-id", "engine-0", "--dtype", "float32", *ENGINE_FLAGS],
        ["engine", str(tiny_dir), "--listen", addresses[1], "--engine-id", "engine-1"]
        + ["--served-model-name", TINY, *TINY_FLAGS],
    ]
    engines = [ServerProcess(args, port=port) for args, port in zip(engine_args, ports, strict=True)]
    api = start_api(addresses)
    try:
        api.wait_healthy()
        wait_for_engines(api.base_url, lambda e: e["alive"] and e["num_free_blocks"] is not None)
        yield TwoModels(addresses, engines, api, tiny_dir)
    finally:
        for proc in [api, *engines]:
            proc.stop(timeout_s=10)


def start_api(addresses: list[str]) -> ServerProcess:
    port = free_port()
    engines = [arg for address in addresses for arg in ("--engine", address)]
    return ServerProcess(["api", *engines, "--port", str(port)], port=port)


def _greedy_completion(models: TwoModels, model: str, api: ServerProcess | None = None) -> dict:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    base_url = (api or models.api).base_url
    resp = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_models_lists_every_model_default_first_and_health_reports_each(two_models: TwoModels) -> None:
    cards = httpx.get(f"{two_models.api.base_url}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [DEFAULT_MODEL_NAME, TINY]
    assert [c["max_model_len"] for c in cards] == [1024, 256]  # each model's own limit
    card = httpx.get(f"{two_models.api.base_url}/v1/models/{TINY}").json()
    assert (card["id"], card["parent"]) == (TINY, None)
    resp = httpx.get(f"{two_models.api.base_url}/health")
    assert resp.status_code == 200
    models = resp.json()["models"]
    assert models == {
        DEFAULT_MODEL_NAME: {"healthy": True, "num_engines": 1, "num_engines_alive": 1},
        TINY: {"healthy": True, "num_engines": 1, "num_engines_alive": 1},
    }


def test_each_model_gives_its_own_greedy_answer(two_models: TwoModels) -> None:
    tiny = _greedy_completion(two_models, TINY)
    choice = tiny["choices"][0]
    assert tiny["model"] == TINY
    # The reference: transformers' greedy continuation of the same prompt ids on the same weights.
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(two_models.tiny_dir, dtype=torch.float32).eval()
    ids = list(choice["prompt_token_ids"])
    expected = []
    with torch.no_grad():
        for _ in range(8):
            next_id = int(reference(torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(next_id)
            ids.append(next_id)
    assert choice["token_ids"] == expected
    # The default model through this API tier answers as through an API process that fronts it alone.
    alone = start_api(two_models.addresses[:1])
    try:
        alone.wait_healthy()
        expected_default = _greedy_completion(two_models, DEFAULT_MODEL_NAME, alone)["choices"][0]
    finally:
        alone.stop()
    for model in (DEFAULT_MODEL_NAME, None):  # no `model`: the default (first) model
        got = _greedy_completion(two_models, model)["choices"][0]  # type: ignore[arg-type]
        assert got["token_ids"] == expected_default["token_ids"]
        assert got["text"] == expected_default["text"]
    assert choice["prompt_token_ids"] != expected_default["prompt_token_ids"]  # two tokenizers


def test_chat_tokenize_and_generate_use_the_requested_models_context(two_models: TwoModels) -> None:
    from tokenizers import Tokenizer

    tiny_tokenizer = Tokenizer.from_file(str(two_models.tiny_dir / "tokenizer.json"))
    tokens = two_models.post("/tokenize", {"model": TINY, "prompt": PROMPT, "add_special_tokens": False})
    assert tokens.json()["tokens"] == tiny_tokenizer.encode(PROMPT, add_special_tokens=False).ids
    assert tokens.json()["max_model_len"] == 256
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True}
    num_prompt_tokens = {}
    for model in (TINY, DEFAULT_MODEL_NAME):
        resp = two_models.post("/v1/chat/completions", {**chat, "model": model})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model and resp.json()["usage"]["completion_tokens"] == 3
        num_prompt_tokens[model] = resp.json()["usage"]["prompt_tokens"]
        rendered = two_models.post("/tokenize", {"model": model, "messages": chat["messages"]}).json()
        assert rendered["count"] == num_prompt_tokens[model]
    # Each model's own template and tokenizer: SmolLM2's template adds a system prompt, the tiny one's not.
    assert num_prompt_tokens[TINY] < num_prompt_tokens[DEFAULT_MODEL_NAME]
    gen = two_models.post(
        "/inference/v1/generate",
        {"model": TINY, "token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 2}},
    )
    assert gen.status_code == 200, gen.text


def test_an_unknown_model_is_404_everywhere(two_models: TwoModels) -> None:
    for path, body in [
        ("/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 1}),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        ("/tokenize", {"model": "nope", "prompt": "x"}),
    ]:
        resp = two_models.post(path, body)
        assert resp.status_code == 404, (path, resp.text)
        assert resp.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{two_models.api.base_url}/v1/models/nope").status_code == 404


def test_metrics_label_each_engine_and_request_with_its_model(two_models: TwoModels) -> None:
    _greedy_completion(two_models, TINY)
    text = httpx.get(f"{two_models.api.base_url}/metrics").text
    alive = metric_samples(text, "tandem:engine_alive")
    assert alive == {
        f'engine="engine-0",model_name="{DEFAULT_MODEL_NAME}"': 1.0,
        f'engine="engine-1",model_name="{TINY}"': 1.0,
    }
    generated = metric_samples(text, "vllm:generation_tokens_total")
    assert any(TINY in labels and "engine-1" in labels and value >= 8 for labels, value in generated.items())


def test_killing_one_models_engine_leaves_the_other_serving(two_models: TwoModels) -> None:
    two_models.engines[1].proc.kill()
    deadline = time.monotonic() + 60
    models: dict = {}
    while time.monotonic() < deadline:
        resp = httpx.get(f"{two_models.api.base_url}/health")
        models = resp.json()["models"]
        if not models[TINY]["healthy"]:
            break
        time.sleep(0.2)
    assert resp.status_code == 200 and models[DEFAULT_MODEL_NAME]["healthy"] and not models[TINY]["healthy"]
    lost = two_models.post("/v1/completions", {"model": TINY, "prompt": PROMPT, "max_tokens": 2})
    assert lost.status_code == 503, lost.text
    assert lost.json()["error"]["type"] == "server_error"
    assert _greedy_completion(two_models, DEFAULT_MODEL_NAME)["usage"]["completion_tokens"] == 8
    # The dead model is still listed (it comes back when its engine does); an unknown one is still 404.
    assert TINY in [c["id"] for c in httpx.get(f"{two_models.api.base_url}/v1/models").json()["data"]]


def test_serve_model_config_starts_each_model_with_its_options(tmp_path: Path) -> None:
    first = tiny_folder(tmp_path / "a")
    second = tiny_folder(tmp_path / "b", "qwen2", seed=1)
    config = tmp_path / "models.yaml"
    config.write_text(
        f"- model: {first}\n  served_model_name: tiny-a\n"
        f"- model: {second}\n  served_model_name: [tiny-b, tiny-b-alias]\n  data_parallel_size: 2\n"
        "  max_model_len: 128\n"
        "- task: embed\n  served_model_name: minilm\n"  # no model: the default embedding model
    )
    server = serve(["--model-config", str(config), *TINY_FLAGS])
    try:
        wait_for_engines(server.base_url, lambda e: e["alive"])
        assert len(httpx.get(f"{server.base_url}/load").json()["engines"]) == 4
        cards = httpx.get(f"{server.base_url}/v1/models").json()["data"]
        assert [(c["id"], c["max_model_len"]) for c in cards] == [
            ("tiny-a", 256),
            ("tiny-b", 128),
            ("tiny-b-alias", 128),
            ("minilm", 256),
        ]
        for model in ("tiny-a", "tiny-b-alias"):
            body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "ignore_eos": True}
            resp = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
            assert resp.status_code == 200, resp.text
            assert resp.json()["model"] == model
        health = httpx.get(f"{server.base_url}/health").json()
        assert health["models"]["tiny-b"] == {"healthy": True, "num_engines": 2, "num_engines_alive": 2}
        # An embedding model and generation models behind one API tier: each endpoint checks the
        # requested model's task.
        embed = {"model": "minilm", "input": ["one", "two"]}
        resp = httpx.post(f"{server.base_url}/v1/embeddings", json=embed, timeout=60)
        assert resp.status_code == 200, resp.text
        assert [len(d["embedding"]) for d in resp.json()["data"]] == [384, 384]
        wrong = httpx.post(f"{server.base_url}/v1/embeddings", json={**embed, "model": "tiny-a"}, timeout=60)
        assert wrong.status_code == 400 and "'tiny-a' is served for text generation" in wrong.text
        wrong = httpx.post(f"{server.base_url}/v1/completions", json={"model": "minilm", "prompt": "x"})
        assert wrong.status_code == 400 and "'minilm' is served for embeddings" in wrong.text
    finally:
        server.stop()


def test_serve_model_config_refuses_a_bad_file(tmp_path: Path) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps([{"model": "x", "max_model_length": 5}]))
    server = ServerProcess(["serve", "--model-config", str(config), "--port", str(free_port())])
    assert server.proc.wait(timeout=60) == 2
    server.stop()
    assert "unknown option `max_model_length`" in server.log_tail()
