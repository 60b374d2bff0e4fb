"""One API process in front of engines of two models (scripted fake engines on real ZeroMQ sockets):
routing by model, the model table built from handshakes, LoRA adapters learned from READY and from
every engine's broadcast LoraResult, and adapter operations that time out or meet a lost engine."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest
import zmq.asyncio

from frontend.engine_client import EngineClient, EngineConnection, EngineUnavailable
from frontend.errors import APIError
from frontend.model_registry import ModelRegistry
from protocol.messages import FinishReason, LoadLora, LoraAdapter, Ready, RequestDelta, UnloadLora
from tests.engine.conftest import build_tiny_tokenizer_json
from tests.frontend.test_engine_client import FakeEngine, _add, _until
from tests.server_process import free_port

pytestmark = pytest.mark.anyio

TOKENIZER = build_tiny_tokenizer_json()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TwoModels:
    def __init__(self, client: EngineClient, registry: ModelRegistry, engines: list[FakeEngine]) -> None:
        self.client, self.registry, self.engines = client, registry, engines


@pytest.fixture
async def two_models() -> AsyncIterator[TwoModels]:
    """Engines 0 and 1 serve model "alpha" (1 with LoRA on, holding adapter "sql" from start-up),
    engine 2 serves "beta" under two names."""
    gc.collect()
    gc.freeze()  # as in test_engine_client: a full collection must not stall the loop past dead_after_s
    ctx = zmq.asyncio.Context()
    engines = [
        FakeEngine(ctx, f"tcp://127.0.0.1:{free_port()}", "a0", served_model_names=("alpha",)),
        FakeEngine(
            ctx, f"tcp://127.0.0.1:{free_port()}", "a1", served_model_names=("alpha",), enable_lora=True
        ),
        FakeEngine(ctx, f"tcp://127.0.0.1:{free_port()}", "b0", served_model_names=("beta", "beta-alias")),
    ]
    engines[1].adapters["sql"] = LoraAdapter("sql", "/adapters/sql", rank=8)
    for engine in engines:
        engine.tokenizer_json = TOKENIZER
        engine.start()
    client = EngineClient([e.address for e in engines], heartbeat_interval_s=0.1, dead_after_s=2.0)
    registry = ModelRegistry()
    client.on_engine_change = lambda conn: registry.update(conn, client.engines)
    await client.start(timeout_s=5)
    await _until(lambda: all(c.alive for c in client.engines))
    yield TwoModels(client, registry, engines)
    await client.close()
    for engine in engines:
        engine.stop()
    ctx.destroy(linger=0)
    gc.unfreeze()


async def _finish(engine: FakeEngine, request_id: str) -> None:
    await _until(lambda: any(add.request_id == request_id for _, add in engine.adds))
    client_id = next(c for c, add in engine.adds if add.request_id == request_id)
    engine.deltas(client_id, RequestDelta(request_id, [7], finish_reason=FinishReason.LENGTH))


async def test_names_resolve_to_their_model_and_unknown_names_are_404(two_models: TwoModels) -> None:
    registry = two_models.registry
    assert registry.resolve(None).model_name == "alpha"  # the first engine's model is the default
    assert registry.resolve("beta-alias").group == "beta"
    assert registry.resolve("beta").tokenizer is registry.resolve("beta-alias").tokenizer  # one context
    sql = registry.resolve("sql")
    assert (sql.group, sql.lora_name, sql.check_model("sql")) == ("alpha", "sql", "sql")
    assert [c.model_name for c in registry.models_in_order()] == ["alpha", "beta"]
    with pytest.raises(APIError) as err:
        registry.resolve("gamma")
    assert (err.value.status, err.value.code) == (404, "model_not_found")


async def test_requests_run_only_on_their_models_engines(two_models: TwoModels) -> None:
    client, (a0, a1, b0) = two_models.client, two_models.engines
    for i in range(4):
        stream = client.generate(_add(f"beta-{i}"), group="beta", model_name="beta")
        first = asyncio.ensure_future(anext(stream))
        await _finish(b0, f"beta-{i}")
        assert (await first).new_token_ids == [7]
        await stream.aclose()
    assert a0.adds == [] and a1.adds == []
    # An adapter request goes only to the engine of its base model that holds the adapter.
    add = _add("lora-1")
    add.lora_name = "sql"
    stream = client.generate(add, group="alpha")
    first = asyncio.ensure_future(anext(stream))
    await _finish(a1, "lora-1")
    await first
    await stream.aclose()
    assert a0.adds == [] and [m.lora_name for _, m in a1.adds] == ["sql"]


async def test_a_model_whose_engines_are_down_is_unavailable_while_the_other_serves(
    two_models: TwoModels,
) -> None:
    client, b0 = two_models.client, two_models.engines[2]
    b0.stop()
    await _until(lambda: not client.engines[2].alive)
    with pytest.raises(EngineUnavailable):
        client.pick_engine([1, 2], group="beta")
    assert client.pick_engine([1, 2], group="alpha").group == "alpha"
    health = two_models.registry.health(client.engines)
    assert health["beta"] == {"healthy": False, "num_engines": 1, "num_engines_alive": 0}
    assert health["alpha"] == {"healthy": True, "num_engines": 2, "num_engines_alive": 2}
    assert two_models.registry.resolve("beta").model_name == "beta"  # still known: 503 there, not 404


async def test_adapter_operations_reach_every_engine_and_every_table(two_models: TwoModels) -> None:
    client, registry, (_a0, a1, _b0) = two_models.client, two_models.registry, two_models.engines
    alpha_lora = [c for c in client.engines if c.group == "alpha" and c.ready and c.ready.enable_lora]
    results = await client.lora_op(alpha_lora, LoadLora("op1", LoraAdapter("chat", "/adapters/chat")), 5.0)
    assert [r.error for r in results] == [None]
    assert isinstance(a1.lora_ops[0], LoadLora) and a1.lora_ops[0].op_id == "op1-1"
    assert registry.resolve("chat").lora_name == "chat"
    assert registry.adapters["chat"][0].rank == 8  # as the engine reported it
    # A change another API process asked for reaches this one too (the engine broadcasts it).
    a1.lora_answer = None
    a1._answer_lora(UnloadLora("someone-else", "sql"))
    await _until(lambda: "sql" not in registry.by_name)
    with pytest.raises(APIError):
        registry.resolve("sql")
    # A refusal comes back with the engine's reason and status.
    a1.lora_answer = ("rank 64 is above --max-lora-rank 8", 400)
    (result,) = await client.lora_op(alpha_lora, LoadLora("op2", LoraAdapter("big", "/adapters/big")), 5.0)
    assert (result.error, result.error_status) == ("rank 64 is above --max-lora-rank 8", 400)
    assert "big" not in registry.by_name


async def test_adapter_operations_that_get_no_answer_end_with_503(two_models: TwoModels) -> None:
    client, (_a0, a1, _b0) = two_models.client, two_models.engines
    conn = client.engines[1]
    a1.lora_answer = "silent"
    (result,) = await client.lora_op([conn], LoadLora("op3", LoraAdapter("x", "/x")), 0.5)
    assert result.error_status == 503 and "try again" in (result.error or "")
    # An engine lost while the operation waits ends it at once, not at the timeout.
    task = asyncio.ensure_future(client.lora_op([conn], LoadLora("op4", LoraAdapter("y", "/y")), 60.0))
    await _until(lambda: len(a1.lora_ops) == 2)
    a1.stop()
    (result,) = await asyncio.wait_for(task, 15)
    assert result.error_status == 503
    assert len(client._lora_ops) == 0  # no operation left waiting


def _conn(index: int, names: list[str]) -> EngineConnection:
    conn = EngineConnection(f"ipc:///nowhere-{index}", index, alive=True, group=names[0])
    conn.ready = Ready(f"e{index}", names, 64, 512, 8, 16, TOKENIZER, None, None, None, [2], False)
    return conn


def test_the_default_is_the_first_engines_model_and_an_override_renames_only_it() -> None:
    engines = [_conn(0, ["alpha"]), _conn(1, ["beta"])]
    registry = ModelRegistry(name_overrides=("renamed",))
    registry.update(engines[1], engines)  # engine 1 answers first: its model is the default for now
    assert registry.resolve(None).served_model_names == ["renamed"]
    registry.update(engines[0], engines)  # engine 0 answers: its model becomes the default
    assert [c.served_model_names for c in registry.models_in_order()] == [["renamed"], ["beta"]]
    assert registry.resolve("renamed").group == "alpha" and registry.resolve("beta").group == "beta"
    with pytest.raises(APIError):
        registry.resolve("alpha")
