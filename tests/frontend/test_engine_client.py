"""EngineClient against scripted fake engines (real ZeroMQ ROUTER sockets, no model): handshake, routing,
engines that die or go silent, retries, re-handshakes and request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import zmq
import zmq.asyncio

from frontend.engine_client import EngineClient, RequestTiming
from protocol.framing import decode, encode
from protocol.messages import (
    Abort,
    AddRequest,
    FinishReason,
    Heartbeat,
    Hello,
    LoadLora,
    LoraAdapter,
    LoraResult,
    Outputs,
    Ready,
    RequestDelta,
    SamplingParams,
    SchedulerStats,
    UnloadLora,
)
from tests.server_process import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeEngine:
    """A ROUTER that handshakes, beats, records ADD/ABORT, and sends whatever deltas a test scripts.
    With beat=False it plays a hung engine: the connection stays open but nothing comes back."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        engine_id: str,
        *,
        beat: bool = True,
        served_model_names: tuple[str, ...] = ("m",),
        tokenizer_json: str = "{}",
        enable_lora: bool = False,
        limits: tuple[int, int | None] = (0, None),  # announced (max_num_seqs, max_waiting_requests)
    ) -> None:
        self.ctx, self.address, self.engine_id, self.beat = ctx, address, engine_id, beat
        self.limits = limits
        self.served_model_names, self.tokenizer_json = list(served_model_names), tokenizer_json
        # LoRA: adapters held, every LoadLora/UnloadLora seen, and the scripted answer to the next ones
        # (None: do it; a (message, status) pair: refuse with it; "silent": never answer).
        self.enable_lora = enable_lora
        self.adapters: dict[str, LoraAdapter] = {}
        self.lora_ops: list[LoadLora | UnloadLora] = []
        self.lora_answer: tuple[str, int] | str | None = None
        self.adds: list[tuple[bytes, AddRequest]] = []
        self.aborted: list[str] = []
        self.clients: set[bytes] = set()
        self.running = 0
        self.sock: zmq.asyncio.Socket | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.tasks = [asyncio.create_task(self._recv()), asyncio.create_task(self._beats())]

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.sock is not None:
            self.sock.close(0)
        self.sock = None

    def send(self, client: bytes, message: object) -> None:
        assert self.sock is not None
        self.sock.send_multipart([client, *encode(message)])

    def deltas(self, client: bytes, *deltas: RequestDelta) -> None:
        self.send(client, Outputs(self.engine_id, list(deltas), SchedulerStats(self.running, 0, 0.0)))

    async def _recv(self) -> None:
        assert self.sock is not None
        while True:
            client, *frames = await self.sock.recv_multipart()
            message, _ = decode(frames)
            self.clients.add(client)
            if not self.beat:
                continue  # hung: neither beats nor answers
            if isinstance(message, Hello):
                self.send(client, self.ready())
            elif isinstance(message, LoadLora | UnloadLora):
                self.lora_ops.append(message)
                self._answer_lora(message)
            elif isinstance(message, AddRequest):
                self.adds.append((client, message))
            elif isinstance(message, Abort):
                self.aborted.extend(message.request_ids)

    def ready(self) -> Ready:
        return Ready(
            self.engine_id,
            self.served_model_names,
            64,
            512,
            8,
            16,
            self.tokenizer_json,
            None,
            None,
            None,
            [2],
            False,
            enable_lora=self.enable_lora,
            max_lora_rank=8 if self.enable_lora else 0,
            lora_adapters=list(self.adapters.values()),
            max_num_seqs=self.limits[0],
            max_waiting_requests=self.limits[1],
        )

    def _answer_lora(self, message: LoadLora | UnloadLora) -> None:
        if self.lora_answer == "silent":
            return
        error, status = self.lora_answer if isinstance(self.lora_answer, tuple) else (None, 400)
        if error is None and isinstance(message, LoadLora):
            self.adapters[message.adapter.name] = msgspec.structs.replace(message.adapter, rank=8)
        elif error is None and isinstance(message, UnloadLora):
            self.adapters.pop(message.name, None)
        result = LoraResult(message.op_id, self.engine_id, list(self.adapters.values()), error, status)
        for client in self.clients:  # as the real engine: every connected API process learns it
            self.send(client, result)

    async def _beats(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.beat:
                for client in self.clients:
                    self.send(client, Heartbeat(time.time(), SchedulerStats(self.running, 0, 0.0)))


class Recorder:
    def __init__(self) -> None:
        self.timings: list[RequestTiming] = []

    def record_request(self, timing: RequestTiming, finished_at: float) -> None:
        self.timings.append(timing)


def _add(request_id: str, prompt: list[int] | None = None) -> AddRequest:
    return AddRequest(request_id, prompt or [1, 2, 3], SamplingParams(max_tokens=4), time.time())


async def _until(predicate, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    # The bounds are generous on purpose: on a loaded 2-core CI machine the event loop that runs the
    # client and both fake engines can stall for a second; a passing run returns as soon as it can.
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


@pytest.fixture
async def two_engines() -> AsyncIterator[tuple[EngineClient, FakeEngine, FakeEngine]]:
    # Earlier tests in this process (real models, hypothesis) leave a large heap: a full garbage
    # collection of it stalled the event loop long enough to mark both live fake engines down in full
    # suite runs. Freezing it keeps those objects out of the collections made during these tests.
    gc.collect()
    gc.freeze()
    ctx = zmq.asyncio.Context()
    a = FakeEngine(ctx, f"tcp://127.0.0.1:{free_port()}", "engine-a")
    b = FakeEngine(ctx, f"tcp://127.0.0.1:{free_port()}", "engine-b")
    a.start()
    b.start()
    # 2 s of silence marks an engine down: far above the 0.1 s beats even when the loop stalls.
    client = EngineClient([a.address, b.address], heartbeat_interval_s=0.1, dead_after_s=2.0)
    await client.start(timeout_s=5)
    await _until(lambda: all(c.alive for c in client.engines))
    yield client, a, b
    await client.close()
    a.stop()
    b.stop()
    ctx.destroy(linger=0)
    gc.unfreeze()


async def test_requests_go_to_the_least_loaded_engine(two_engines) -> None:  # noqa: ANN001
    client, a, b = two_engines
    a.running = 10  # engine a reports a long queue
    await asyncio.sleep(0.3)
    stream = client.generate(_add("r1"))
    task = asyncio.ensure_future(anext(stream))
    await _until(lambda: len(b.adds) == 1)
    assert a.adds == []
    b.deltas(b.adds[0][0], RequestDelta("r1", [7], finish_reason=FinishReason.LENGTH))
    delta = await task
    assert delta.new_token_ids == [7]
    await stream.aclose()


async def test_closing_a_stream_early_aborts_on_the_engine(two_engines) -> None:  # noqa: ANN001
    client, a, b = two_engines
    stream = client.generate(_add("r2"))
    task = asyncio.ensure_future(anext(stream))
    await _until(lambda: len(a.adds) + len(b.adds) == 1)
    engine = a if a.adds else b
    engine.deltas(engine.adds[0][0], RequestDelta("r2", [5]))
    await task
    await stream.aclose()
    await _until(lambda: engine.aborted == ["r2"])


async def test_dead_engine_fails_started_requests_and_retries_fresh_ones(two_engines) -> None:  # noqa: ANN001
    client, a, b = two_engines
    client.dead_after_s = 30.0  # so only the closed connection can explain a quick failover
    recorder = Recorder()
    client.metrics = recorder
    # One request per engine: "started" on a gets a token, "fresh" on a gets none.
    started = client.generate(_add("started"))
    first = asyncio.ensure_future(anext(started))
    await _until(lambda: len(a.adds) + len(b.adds) == 1)
    victim, survivor = (a, b) if a.adds else (b, a)
    victim.deltas(victim.adds[0][0], RequestDelta("started", [9]))
    assert (await first).new_token_ids == [9]
    fresh_conn = next(c for c in client.engines if c.address == victim.address)
    fresh = client.generate(_add("fresh"))
    client_pick = client.pick_engine
    client.pick_engine = lambda ids, exclude=None, **kw: (  # type: ignore[method-assign]
        fresh_conn if not exclude else client_pick(ids, exclude, **kw)
    )
    fresh_first = asyncio.ensure_future(anext(fresh))
    await _until(lambda: len(victim.adds) == 2)
    t0 = time.monotonic()
    victim.stop()  # the process is gone: its connection closes
    lost = await asyncio.wait_for(anext(started), 15)
    assert lost.finish_reason == FinishReason.ERROR and lost.error_status == 503
    # Noticed from the closed connection, not after 30 s of missed beats (loose bound for loaded CI).
    assert time.monotonic() - t0 < 10.0
    # The request without tokens went to the other engine and finishes there.
    await _until(lambda: [m.request_id for _, m in survivor.adds] == ["fresh"])
    survivor.deltas(survivor.adds[0][0], RequestDelta("fresh", [4], finish_reason=FinishReason.STOP))
    assert (await fresh_first).finish_reason == FinishReason.STOP
    assert client.num_retries == 1
    await started.aclose()
    await fresh.aclose()
    reasons = sorted((t.engine, t.finish_reason, t.num_generation_tokens) for t in recorder.timings)
    assert reasons == sorted([(victim.engine_id, "error", 1), (survivor.engine_id, "stop", 1)])


async def test_silent_engine_is_marked_down_and_rehandshaken_when_back(two_engines) -> None:  # noqa: ANN001
    client, a, _b = two_engines
    a.beat = False
    conn = client.engines[0]
    await _until(lambda: not conn.alive)
    # b is still live. Waited for, not asserted at once: a stall of the shared loop on a loaded CI machine
    # can mark b down for a moment too, and it handshakes again by itself, which is the point of this test.
    await _until(lambda: not conn.alive and client.engines[1].alive and client.is_healthy)
    # Restart engine a on the same address: the client handshakes again by itself.
    a.stop()
    a.beat = True
    await asyncio.sleep(0.2)
    a.start()
    await _until(lambda: conn.alive, timeout_s=20)  # handshakes are retried every 2 s


async def test_health_is_false_with_no_live_engine(two_engines) -> None:  # noqa: ANN001
    client, a, b = two_engines
    a.stop()
    b.stop()
    await _until(lambda: not client.is_healthy)
    with pytest.raises(Exception, match="no engine"):
        client.pick_engine([1])


async def test_a_request_that_cannot_be_sent_fails_at_once_with_a_retryable_503(two_engines) -> None:  # noqa: ANN001
    client, a, b = two_engines
    client.dead_after_s = 30.0  # a heartbeat timeout would take this long: the failure must not wait for it
    for conn in client.engines:
        # Fault injection: a DEALER with no connected peer, as in the moment between an engine's death
        # and the client noticing. A non-blocking send on it raises zmq.Again, which was swallowed.
        old = conn.socket
        conn.socket = client.ctx.socket(zmq.DEALER)
        assert old is not None
        old.close(0)
    t0 = time.monotonic()
    deltas = [delta async for delta in client.generate(_add("unsent"))]
    assert time.monotonic() - t0 < 5.0
    assert len(deltas) == 1
    assert deltas[0].finish_reason == FinishReason.ERROR and deltas[0].error_status == 503
    assert client.num_retries == 1  # the second engine was tried too
    assert all(not conn.pending for conn in client.engines)
    assert a.adds == [] and b.adds == []


async def test_a_slow_reader_gets_merged_deltas_not_an_unbounded_queue(two_engines) -> None:  # noqa: ANN001
    client, a, b = two_engines
    stream = client.generate(_add("slow"))
    first = asyncio.ensure_future(anext(stream))
    await _until(lambda: len(a.adds) + len(b.adds) == 1)
    engine = a if a.adds else b
    peer = engine.adds[0][0]
    engine.deltas(peer, RequestDelta("slow", [0], num_prompt_tokens=3))
    assert (await first).new_token_ids == [0]
    # The reader stops reading while the engine produces 200 more steps, the last one final.
    for i in range(1, 201):
        engine.deltas(
            peer, RequestDelta("slow", [i], finish_reason=FinishReason.LENGTH if i == 200 else None)
        )
    conn = next(c for c in client.engines if c.address == engine.address)
    await _until(lambda: conn.pending["slow"].num_tokens == 200)
    assert len(conn.pending["slow"]) == 1  # one merged delta waits, not 200
    rest = [delta async for delta in stream]
    assert [t for d in rest for t in d.new_token_ids] == list(range(1, 201))
    assert rest[-1].finish_reason == FinishReason.LENGTH


async def _collect(stream: AsyncIterator[RequestDelta]) -> list[RequestDelta]:
    return [delta async for delta in stream]


async def test_a_full_engine_is_refused_here_at_once_without_sending() -> None:
    # Under overload the engine reads new requests only between steps, so its own refusal can take a
    # whole step; this process's own outstanding requests already prove it full.
    ctx = zmq.asyncio.Context()
    engine = FakeEngine(ctx, f"tcp://127.0.0.1:{free_port()}", "engine-full", limits=(1, 1))
    engine.start()
    client = EngineClient([engine.address], heartbeat_interval_s=0.1, dead_after_s=5.0)
    try:
        await client.start(timeout_s=5)
        first, second = client.generate(_add("q1")), client.generate(_add("q2"))
        tasks = [asyncio.ensure_future(anext(first)), asyncio.ensure_future(anext(second))]
        await _until(lambda: len(engine.adds) == 2)  # one running + one waiting: both sent
        # Bounded: without the check the request would be sent and wait for an engine that never answers.
        deltas = await asyncio.wait_for(_collect(client.generate(_add("q3"))), timeout=5)
        assert [(d.finish_reason, d.error_status, d.error) for d in deltas] == [
            (FinishReason.ERROR, 503, "the engine's waiting queue is full")
        ]
        assert len(engine.adds) == 2  # refused without a round trip
        # Once one finishes there is room again, and the next request goes to the engine.
        engine.deltas(engine.adds[0][0], RequestDelta("q1", [7], finish_reason=FinishReason.LENGTH))
        await tasks[0]
        await first.aclose()  # the stream leaves the engine's count once its consumer is done with it
        fourth = client.generate(_add("q4"))
        task = asyncio.ensure_future(anext(fourth))
        await _until(lambda: len(engine.adds) == 3)
        for stream, pending in ((second, tasks[1]), (fourth, task)):
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            await stream.aclose()
    finally:
        await client.close()
        engine.stop()
        ctx.destroy(linger=0)
