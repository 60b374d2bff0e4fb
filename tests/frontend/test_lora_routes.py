"""The LoRA API surface of a real `tandem api` process (uvicorn, real ZeroMQ) in front of a scripted fake
engine: /v1/load_lora_adapter and /v1/unload_lora_adapter with vLLM's bodies and plain-text answers,
adapters in /v1/models, requests naming an adapter sent with AddRequest.lora_name, the engine's refusals
and silence turned into 400/404/503, the API key, and no such routes without --enable-lora. (The engine
side of LoRA is tested against real adapters in tests/e2e/test_multi_model_lora.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import zmq.asyncio

from protocol.messages import FinishReason, LoadLora, RequestDelta, UnloadLora
from tests.frontend.test_engine_client import FakeEngine, _until
from tests.frontend.test_multi_model import TOKENIZER
from tests.server_process import ServerProcess, free_port

pytestmark = pytest.mark.anyio
KEY = {"Authorization": "Bearer sesame"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _api_in_front_of(engine: FakeEngine, *flags: str) -> tuple[ServerProcess, httpx.AsyncClient]:
    """A `tandem api` process for the fake engine, waited for without blocking the loop the fake runs on."""
    port = free_port()
    api = ServerProcess(["api", "--engine", engine.address, "--port", str(port), *flags], port=port)
    client = httpx.AsyncClient(base_url=api.base_url, timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if (await client.get("/health")).status_code == 200:
                return api, client
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    api.stop()
    raise TimeoutError(api.log_tail())


@pytest.fixture
async def lora_engine() -> AsyncIterator[FakeEngine]:
    ctx = zmq.asyncio.Context()
    engine = FakeEngine(
        ctx, f"tcp://127.0.0.1:{free_port()}", "lora-0", enable_lora=True, tokenizer_json=TOKENIZER
    )
    engine.start()
    yield engine
    engine.stop()
    ctx.destroy(linger=0)


async def _complete(engine: FakeEngine, client: httpx.AsyncClient, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": 1}
    task = asyncio.ensure_future(client.post("/v1/completions", json=body, headers=KEY))
    num_adds = len(engine.adds)
    await _until(lambda: len(engine.adds) > num_adds or task.done(), timeout_s=30)
    if not task.done():
        sender, add = engine.adds[-1]
        engine.deltas(sender, RequestDelta(add.request_id, [7], finish_reason=FinishReason.LENGTH))
    return await task


async def test_adapters_load_route_list_and_unload(lora_engine: FakeEngine) -> None:
    api, client = await _api_in_front_of(lora_engine, "--api-key", "sesame", "--lora-update-timeout", "1")
    try:
        load = {"lora_name": "sql", "lora_path": "/adapters/sql"}
        assert (await client.post("/v1/load_lora_adapter", json=load)).status_code == 401  # behind the key
        resp = await client.post("/v1/load_lora_adapter", json=load, headers=KEY)
        assert (resp.status_code, resp.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
        assert resp.headers["content-type"].startswith("text/plain")
        (op,) = lora_engine.lora_ops
        assert isinstance(op, LoadLora) and (op.adapter.name, op.adapter.path) == ("sql", "/adapters/sql")
        cards = (await client.get("/v1/models", headers=KEY)).json()["data"]
        assert cards[1] == {
            "id": "sql",
            "object": "model",
            "created": cards[1]["created"],
            "owned_by": "tandem",
            "root": "/adapters/sql",
            "parent": "m",
            "max_model_len": None,
        }
        # A request naming the adapter runs under it; the response names the adapter as its model.
        resp = await _complete(lora_engine, client, "sql")
        assert resp.status_code == 200 and resp.json()["model"] == "sql"
        assert lora_engine.adds[-1][1].lora_name == "sql"
        resp = await _complete(lora_engine, client, "m")
        assert resp.status_code == 200 and lora_engine.adds[-1][1].lora_name is None

        again = await client.post("/v1/load_lora_adapter", json=load, headers=KEY)
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        missing = await client.post("/v1/load_lora_adapter", json={"lora_name": "x"}, headers=KEY)
        assert missing.status_code == 400 and "lora_path" in missing.json()["error"]["message"]
        lora_engine.lora_answer = ("adapter rank 64 is above --max-lora-rank 8", 400)
        refused = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": "/big"}, headers=KEY
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == "adapter rank 64 is above --max-lora-rank 8"
        lora_engine.lora_answer = "silent"
        silent = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": "slow", "lora_path": "/slow"}, headers=KEY
        )
        assert silent.status_code == 503 and silent.headers["retry-after"]
        lora_engine.lora_answer = None

        unknown = await client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=KEY)
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "lora_name"
        resp = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}, headers=KEY)
        assert (resp.status_code, resp.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
        assert isinstance(lora_engine.lora_ops[-1], UnloadLora)
        gone = await client.post("/v1/completions", json={"model": "sql", "prompt": "x"}, headers=KEY)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        assert [c["id"] for c in (await client.get("/v1/models", headers=KEY)).json()["data"]] == ["m"]
    finally:
        await client.aclose()
        api.stop()


async def test_an_adapter_another_api_process_loads_is_served_here_too(lora_engine: FakeEngine) -> None:
    (api_a, a), (api_b, b) = await asyncio.gather(
        _api_in_front_of(lora_engine, "--api-key", "sesame"),
        _api_in_front_of(lora_engine, "--api-key", "sesame"),
    )
    try:
        load = {"lora_name": "chat", "lora_path": "/adapters/chat"}
        assert (await a.post("/v1/load_lora_adapter", json=load, headers=KEY)).status_code == 200
        # b learns it from the engine's broadcast, which may land a moment after a's answer.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cards = (await b.get("/v1/models", headers=KEY)).json()["data"]
            if "chat" in [c["id"] for c in cards]:
                break
            await asyncio.sleep(0.05)
        resp = await _complete(lora_engine, b, "chat")
        assert resp.status_code == 200 and lora_engine.adds[-1][1].lora_name == "chat"
    finally:
        await a.aclose()
        await b.aclose()
        api_a.stop()
        api_b.stop()


async def test_without_enable_lora_the_routes_do_not_exist() -> None:
    ctx = zmq.asyncio.Context()
    engine = FakeEngine(ctx, f"tcp://127.0.0.1:{free_port()}", "plain-0", tokenizer_json=TOKENIZER)
    engine.start()
    api, client = await _api_in_front_of(engine)
    try:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            resp = await client.post(path, json={"lora_name": "sql", "lora_path": "/adapters/sql"})
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
        assert engine.lora_ops == []
    finally:
        await client.aclose()
        api.stop()
        engine.stop()
        ctx.destroy(linger=0)
