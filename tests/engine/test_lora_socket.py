"""LoadLora / UnloadLora against a real `tandem engine --enable-lora` process over real ZeroMQ sockets,
with two API-process sockets: every result reaches both, a bad adapter changes nothing, a request names
an adapter loaded at run time, and a socket that connects later learns the list from READY."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol.framing import decode, encode
from protocol.messages import (
    AddRequest,
    LoadLora,
    LoraAdapter,
    LoraResult,
    Outputs,
    SamplingParams,
    UnloadLora,
)
from tests.engine.lora_adapters import base_model, make_peft_adapter, merged_model, reference_greedy
from tests.engine.test_engine_socket_fuzz import EngineSocket
from tests.server_process import ServerProcess

PROMPT = [11, 23, 35, 47, 59, 71, 83, 95]
MAX_TOKENS = 6


def receive(client: EngineSocket, want: Callable[[object], bool], timeout_s: float = 60.0) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        client.wait_readable()
        message, _ = decode(client.sock.recv_multipart())
        if want(message):
            return message
    raise AssertionError(f"nothing matching arrived:\n{client.engine.log_tail()}")


def lora_result(client: EngineSocket, op_id: str) -> LoraResult:
    result = receive(client, lambda m: isinstance(m, LoraResult) and m.op_id == op_id)
    assert isinstance(result, LoraResult)
    return result


def greedy(client: EngineSocket, lora: str | None) -> list[int]:
    request_id = uuid.uuid4().hex
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    client.send_raw(encode(AddRequest(request_id, PROMPT, sampling, 0.0, lora_name=lora)))
    tokens: list[int] = []
    while True:
        message = receive(client, lambda m: isinstance(m, Outputs))
        assert isinstance(message, Outputs)
        for delta in message.deltas:
            if delta.request_id == request_id:
                assert delta.error is None, delta.error
                tokens += delta.new_token_ids
                if delta.finish_reason is not None:
                    return tokens


def start_engine(model_dir: Path, *flags: str) -> tuple[ServerProcess, str]:
    address = f"ipc:///tmp/tandem-lora-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    common = ["--listen", address, "--kv-cache-memory", "16M", "--num-threads", "1", "--dtype", "float32"]
    return ServerProcess(["engine", str(model_dir), *common, *flags]), address


@pytest.fixture(scope="module")
def adapters(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    model_dir = tiny_model_dir("llama")
    folder = tmp_path_factory.mktemp("lora-socket")
    return {
        "first": make_peft_adapter(base_model(model_dir), folder / "first", seed=11, rank=4),
        "second": make_peft_adapter(base_model(model_dir), folder / "second", seed=12, rank=8),
    }


@pytest.fixture(scope="module")
def engine(
    tiny_model_dir: Callable[[str], Path], adapters: dict[str, Path]
) -> Iterator[tuple[EngineSocket, EngineSocket, str]]:
    flags = ["--enable-lora", "--lora-modules", f"first={adapters['first']}", "--max-lora-rank", "8"]
    proc, address = start_engine(tiny_model_dir("llama"), *flags)
    clients = [EngineSocket(address, proc), EngineSocket(address, proc)]
    try:
        for client in clients:
            ready = client.handshake()
            assert ready.enable_lora and [a.name for a in ready.lora_adapters] == ["first"]
        yield clients[0], clients[1], address
    finally:
        for client in clients:
            client.close()
        code = proc.stop()
        assert code == 0, f"the engine did not shut down cleanly ({code}):\n{proc.log_tail()}"


def test_load_use_and_unload_at_run_time(
    engine: tuple[EngineSocket, EngineSocket, str],
    adapters: dict[str, Path],
    tiny_model_dir: Callable[[str], Path],
) -> None:
    asker, other, address = engine
    base_tokens = greedy(asker, None)
    asker.send_raw(encode(LoadLora("op-load", LoraAdapter("second", str(adapters["second"])))))
    for client in (asker, other):  # both API processes learn the new list
        result = lora_result(client, "op-load")
        assert result.error is None
        assert [(a.name, a.rank) for a in result.adapters] == [("first", 4), ("second", 8)]
    model_dir = tiny_model_dir("llama")
    assert greedy(other, "second") == reference_greedy(
        merged_model(model_dir, adapters["second"]), PROMPT, MAX_TOKENS
    )
    assert greedy(asker, "first") == reference_greedy(
        merged_model(model_dir, adapters["first"]), PROMPT, MAX_TOKENS
    )
    assert greedy(asker, None) == base_tokens

    late = EngineSocket(address, asker.engine)
    try:
        assert [a.name for a in late.handshake().lora_adapters] == ["first", "second"]
    finally:
        late.close()

    other.send_raw(encode(UnloadLora("op-unload", "second")))
    for client in (asker, other):
        result = lora_result(client, "op-unload")
        assert result.error is None and [a.name for a in result.adapters] == ["first"]


def test_refusals_reach_the_asker_and_change_nothing(
    engine: tuple[EngineSocket, EngineSocket, str], tmp_path: Path
) -> None:
    asker, other, _ = engine
    (tmp_path / "adapter_config.json").write_text('{"r": 64, "lora_alpha": 8}')
    asker.send_raw(encode(LoadLora("op-bad", LoraAdapter("big", str(tmp_path)))))
    result = lora_result(asker, "op-bad")
    assert result.error_status == 400 and "--max-lora-rank" in (result.error or "")
    assert [a.name for a in result.adapters] == ["first"]
    assert lora_result(other, "op-bad").error is not None
    asker.send_raw(encode(UnloadLora("op-missing", "never-loaded")))
    result = lora_result(asker, "op-missing")
    assert result.error_status == 404
    asker.send_raw(encode(LoadLora("op-dup", LoraAdapter("first", str(tmp_path)))))
    assert "already loaded" in (lora_result(asker, "op-dup").error or "")


def test_an_engine_without_lora_refuses_adapter_operations(tiny_model_dir: Callable[[str], Path]) -> None:
    proc, address = start_engine(tiny_model_dir("llama"))
    client = EngineSocket(address, proc)
    try:
        assert not client.handshake().enable_lora
        client.send_raw(encode(LoadLora("op", LoraAdapter("x", "/nowhere"))))
        result = lora_result(client, "op")
        assert result.error_status == 400 and "--enable-lora" in (result.error or "")
        assert result.adapters == []
    finally:
        client.close()
        assert proc.stop() == 0, proc.log_tail()
