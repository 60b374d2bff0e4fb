"""`tandem serve --tensor-parallel-size 2` on the default model (CPU, gloo): the greedy answer is TP=1's,
and a killed worker rank ends the engine loudly, after which the launcher restarts it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import DEFAULT_MODEL_NAME
from tests.e2e.test_failures import StreamResult, chat, read_stream
from tests.e2e.test_launcher_restart import _child_pids
from tests.server_process import ServerProcess, serve

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tp_server() -> Iterator[ServerProcess]:
    # float32 like default_server, so the two answers can be compared token for token.
    server = serve(["--dtype", "float32", "--tensor-parallel-size", "2", "--kv-cache-memory", "256M"])
    yield server
    server.stop()


def _greedy_answer(server: ServerProcess) -> dict:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 32,
        "logprobs": True,
    }
    resp = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def test_greedy_france_answer_equals_tp1(tp_server: ServerProcess, default_server: ServerProcess) -> None:
    tp2, tp1 = _greedy_answer(tp_server), _greedy_answer(default_server)
    assert "Paris" in tp1["message"]["content"]
    assert tp2["message"]["content"] == tp1["message"]["content"]
    tokens1, tokens2 = tp1["logprobs"]["content"], tp2["logprobs"]["content"]
    assert [t["bytes"] for t in tokens2] == [t["bytes"] for t in tokens1]
    for a, b in zip(tokens1, tokens2, strict=True):
        assert abs(a["logprob"] - b["logprob"]) < 1e-3


def _worker_pid(server: ServerProcess) -> tuple[int, int]:
    """(engine pid, its tensor-parallel worker's pid)."""
    (engine_pid,) = _child_pids(server.proc.pid, "tandem engine")
    (worker_pid,) = _child_pids(engine_pid, "spawn_main")
    return engine_pid, worker_pid


def test_killed_worker_ends_streams_with_errors_and_engine_restarts(tp_server: ServerProcess) -> None:
    deadline = time.monotonic() + 30  # the launcher restarts children only after it has seen "serving on"
    while "tandem: serving on" not in tp_server.log_tail(20000) and time.monotonic() < deadline:
        time.sleep(0.2)
    engine_pid, worker_pid = _worker_pid(tp_server)
    results = [StreamResult() for _ in range(4)]
    killed_at = 0.0

    async def run() -> None:
        nonlocal killed_at
        async with httpx.AsyncClient(timeout=120) as client:
            body = chat(400, stream=True)
            tasks = [asyncio.ensure_future(read_stream(client, tp_server.base_url, body, r)) for r in results]
            while not all(r.num_tokens > 0 for r in results):
                await asyncio.sleep(0.05)
            os.kill(worker_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)

    asyncio.run(run())
    for r in results:
        assert r.done and r.error is not None and r.error["type"] == "server_error", r
        assert r.num_tokens < 400
        assert r.ended_at - killed_at < 5.0, "an explicit error within seconds, never a hang"
    assert f"tensor-parallel worker tp-rank-1 (pid {worker_pid}) exited with code -9" in tp_server.log_tail(
        50000
    )
    # The engine exits with code 1 right after telling the API process; the launcher restarts it, and the
    # new engine starts its own worker and serves again.
    status, deadline = None, time.monotonic() + 180
    while status != 200 and time.monotonic() < deadline:
        time.sleep(1)
        if "engine-0 exited with code 1; restarted it" not in tp_server.log_tail(50000):
            continue
        try:
            status = httpx.post(
                f"{tp_server.base_url}/v1/chat/completions", json=chat(), timeout=30
            ).status_code
        except httpx.HTTPError:
            status = None
    assert status == 200, tp_server.log_tail()
    assert "engine-0 exited with code 1; restarted it" in tp_server.log_tail(50000)
    new_engine, new_worker = _worker_pid(tp_server)
    assert new_engine != engine_pid and new_worker != worker_pid
    assert subprocess.run(["kill", "-0", str(worker_pid)], capture_output=True).returncode != 0  # gone
