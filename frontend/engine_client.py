"""The API process's side of the wire: one DEALER socket per engine, a receive task each, heartbeats,
routing by least outstanding work, and per-request delta queues. Engines that die or go silent are
marked down; their requests end with an explicit error or, with no token yet, are retried elsewhere."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from contract.finish_reasons import FINISH_REASON_NAMES
from frontend.delta_mailbox import DeltaMailbox
from frontend.errors import ENGINE_LOST_MESSAGE
from protocol.framing import FrameError, decode, encode
from protocol.log_limit import RateLimitedWarning
from protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    AddRequest,
    EngineDead,
    FinishReason,
    Heartbeat,
    Hello,
    Outputs,
    Ready,
    Refused,
    RequestDelta,
    SchedulerStats,
)

logger = logging.getLogger(__name__)

_PREFIX_AFFINITY_TOKENS = 64  # requests whose first tokens match prefer the engine that served them
_AFFINITY_SLACK = 4  # ...unless that engine has this many more outstanding requests than the least loaded
_HELLO_RETRY_S = 2.0  # how often a down engine is asked for a handshake again
# Socket events: a peer process that dies closes its connection at once, long before heartbeats miss.
_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0)


@dataclass(frozen=True)
class EngineLost:
    """Put on a request's queue when its engine dies or goes silent."""

    reason: str  # for the log
    public: str = ENGINE_LOST_MESSAGE  # for the client


@dataclass
class EngineConnection:
    address: str
    index: int
    socket: zmq.asyncio.Socket | None = None
    ready: Ready | None = None
    alive: bool = False
    refused: str | None = None
    last_heard: float = 0.0
    stats: SchedulerStats | None = None
    pending: dict[str, DeltaMailbox[EngineLost]] = field(default_factory=dict)
    recv_task: asyncio.Task[None] | None = None
    monitor_task: asyncio.Task[None] | None = None
    num_served: int = 0
    last_hello: float = 0.0

    @property
    def load(self) -> int:
        reported = (self.stats.num_running + self.stats.num_waiting) if self.stats else 0
        return max(len(self.pending), reported)


class EngineUnavailable(Exception):
    """No live engine can take the request."""


@dataclass
class RequestTiming:
    """What the metrics need to know about one finished engine request."""

    arrival_time: float  # wall clock (time.time()), as sent in AddRequest
    engine: str = ""
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    finish_reason: str = "abort"
    queue_time_s: float | None = None  # measured by the engine
    max_tokens: int = 0  # the request's parameters, for vllm:request_params_*
    n: int = 1
    num_preemptions: int = 0  # reported by the engine with the last token

    def observe(self, delta: RequestDelta, now: float) -> None:
        self.num_prompt_tokens = delta.num_prompt_tokens or self.num_prompt_tokens
        self.num_preemptions = max(self.num_preemptions, delta.num_preemptions)
        if delta.queue_time_s is not None:
            self.queue_time_s = delta.queue_time_s
        if not delta.new_token_ids:
            return
        if self.last_token_at is None:
            self.first_token_at = now
        else:
            self.inter_token_s.append(now - self.last_token_at)
        self.last_token_at = now
        self.num_generation_tokens += len(delta.new_token_ids)


class RequestMetricsSink(Protocol):
    def record_request(self, timing: RequestTiming, finished_at: float) -> None: ...


class EngineClient:
    def __init__(
        self,
        addresses: list[str],
        *,
        client_name: str | None = None,
        heartbeat_interval_s: float = 1.0,
        dead_after_s: float = 5.0,
        curve_keys: dict[str, bytes] | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one engine address is needed")
        self.ctx = zmq.asyncio.Context()
        self.client_name = client_name or f"api-{os.getpid()}"
        self.heartbeat_interval_s = heartbeat_interval_s
        self.dead_after_s = dead_after_s
        self.curve_keys = curve_keys or {}
        self.engines = [EngineConnection(addr, i) for i, addr in enumerate(addresses)]
        self._ready_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._affinity: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self.num_bad_messages = 0
        self._bad_message_warning = RateLimitedWarning(logger)  # a garbling peer must not flood the log
        self.num_retries = 0
        self.metrics: RequestMetricsSink | None = None  # set by the app; records every finished request

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self, timeout_s: float = 600.0) -> Ready:
        for conn in self.engines:
            self._open(conn)
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        except TimeoutError as exc:
            reasons = [c.refused for c in self.engines if c.refused]
            detail = f": {reasons[0]}" if reasons else ""
            raise EngineUnavailable(f"no engine answered within {timeout_s:.0f}s{detail}") from exc
        return self.model_info

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conn in self.engines:
            self._close_socket(conn)
        self.ctx.destroy(linger=0)

    @property
    def model_info(self) -> Ready:
        for conn in self.engines:
            if conn.ready is not None:
                return conn.ready
        raise EngineUnavailable("no engine has completed its handshake")

    @property
    def is_healthy(self) -> bool:
        return any(c.alive for c in self.engines)

    def _open(self, conn: EngineConnection) -> None:
        sock: zmq.asyncio.Socket = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.client_name}-{uuid.uuid4().hex[:8]}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if self.curve_keys:
            sock.curve_secretkey = self.curve_keys["client_secret"]
            sock.curve_publickey = self.curve_keys["client_public"]
            sock.curve_serverkey = self.curve_keys["server_public"]
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(conn.address)
        conn.socket = sock
        conn.recv_task = asyncio.create_task(self._recv_loop(conn, sock))
        conn.monitor_task = asyncio.create_task(self._monitor_loop(conn, sock, monitor))
        conn.last_hello = time.monotonic()
        self._send(conn, Hello(PROTOCOL_VERSION, self.client_name))

    def _close_socket(self, conn: EngineConnection) -> None:
        for task in (conn.recv_task, conn.monitor_task):
            if task is not None:
                task.cancel()
        if conn.socket is not None:
            conn.socket.close(0)
        conn.socket = None

    def _send(self, conn: EngineConnection, message: object, buffers: list[bytes] | None = None) -> None:
        """Best effort, for control messages (HELLO, heartbeats, aborts): a lost one is sent again or
        made moot by the engine's own timeouts."""
        self._send_frames(conn, encode(message, buffers or []))

    def _send_frames(self, conn: EngineConnection, frames: list[bytes | memoryview]) -> bool:
        """False when the frames did not leave (no socket, no connected peer, a full queue)."""
        if conn.socket is None:
            return False
        try:
            # An asyncio socket tries a NOBLOCK send at once and reports the outcome on a finished
            # future, not by raising: zmq.Again (no connected peer, a full queue) is found there.
            sent = cast("asyncio.Future[object]", conn.socket.send_multipart(frames, flags=zmq.NOBLOCK))
            error = sent.exception() if sent.done() else None
        except zmq.ZMQError as exc:
            error = exc
        return error is None

    # -- receiving ------------------------------------------------------------------------------------
    async def _recv_loop(self, conn: EngineConnection, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                message, _extra = decode(frames)
            except FrameError as exc:
                self.num_bad_messages += 1
                self._bad_message_warning.warn(
                    "dropped an undecodable message from engine %s: %.300s", conn.address, exc
                )
                continue
            conn.last_heard = time.monotonic()
            self._dispatch(conn, message)

    async def _monitor_loop(
        self, conn: EngineConnection, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket
    ) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if conn.socket is not sock:
                    return  # a newer socket took over this engine
                if event["event"] == zmq.EVENT_DISCONNECTED and conn.alive:
                    self._mark_dead(conn, f"engine {conn.address} closed its connection")
                    return
                if event["event"] != zmq.EVENT_DISCONNECTED and conn.refused is None:
                    conn.refused = (
                        "CurveZMQ authentication failed: the engine does not accept this client key"
                    )
                    logger.error("engine %s: %s", conn.address, conn.refused)
        except (zmq.ZMQError, asyncio.CancelledError):
            return
        finally:
            monitor.close(0)

    def _dispatch(self, conn: EngineConnection, message: object) -> None:
        if isinstance(message, Outputs):
            conn.stats = message.stats or conn.stats
            for delta in message.deltas:
                queue = conn.pending.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
        elif isinstance(message, Heartbeat):
            conn.stats = message.stats or conn.stats
        elif isinstance(message, Ready):
            if not conn.alive:
                logger.info("engine %s is up (%s)", conn.address, message.engine_id)
            conn.ready, conn.alive, conn.refused = message, True, None
            self._ready_event.set()
        elif isinstance(message, Refused):
            conn.refused = message.reason
            logger.error("engine %s refused this API process: %s", conn.address, message.reason)
        elif isinstance(message, EngineDead):
            logger.error("engine %s reported a fatal error: %s", conn.address, message.message)
            self._mark_dead(conn, f"engine failed: {message.message}")

    # -- liveness -------------------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            now = time.monotonic()
            for conn in self.engines:
                if conn.alive and now - conn.last_heard > self.dead_after_s:
                    self._mark_dead(conn, f"engine {conn.address} stopped answering")
                if conn.alive:
                    self._send(conn, Heartbeat(time.time()))
                elif now - conn.last_hello >= _HELLO_RETRY_S:
                    conn.last_hello = now
                    self._send(conn, Hello(PROTOCOL_VERSION, self.client_name))

    def _mark_dead(self, conn: EngineConnection, reason: str) -> None:
        if conn.alive:
            logger.error("marking engine %s down: %s", conn.address, reason)
        conn.alive = False
        conn.stats = None
        for _request_id, queue in list(conn.pending.items()):
            queue.put_nowait(EngineLost(reason))
        conn.pending.clear()
        # A fresh socket drops anything queued for the dead peer, so a restarted engine never runs stale work.
        self._close_socket(conn)
        self._open(conn)

    # -- requests -------------------------------------------------------------------------------------
    def pick_engine(self, prompt_token_ids: list[int], exclude: set[int] | None = None) -> EngineConnection:
        live = [c for c in self.engines if c.alive and (not exclude or c.index not in exclude)]
        if not live:
            raise EngineUnavailable("no engine is available")
        least = min(live, key=lambda c: c.load)
        key = tuple(prompt_token_ids[:_PREFIX_AFFINITY_TOKENS])
        if len(key) == _PREFIX_AFFINITY_TOKENS:
            preferred = self._affinity.get(key)
            for conn in live:
                if conn.index == preferred and conn.load <= least.load + _AFFINITY_SLACK:
                    least = conn
            self._affinity[key] = least.index
            self._affinity.move_to_end(key)
            if len(self._affinity) > 4096:
                self._affinity.popitem(last=False)
        return least

    async def generate(
        self,
        request: AddRequest,
        buffers: list[bytes] | None = None,
        *,
        outcome: Callable[[], str | None] | None = None,
        n: int = 1,
    ) -> AsyncGenerator[RequestDelta, None]:
        """Deltas for one request until it finishes. Closing the iterator early aborts it on the engine.

        `outcome` tells the metrics why a request the caller closed early ended (a stop string: "stop");
        `n` is the API request's number of choices, of which this engine request is one.
        """
        timing = RequestTiming(
            request.arrival_time,
            num_prompt_tokens=len(request.prompt_token_ids),
            max_tokens=request.sampling.max_tokens,
            n=n,
        )
        deltas = self._generate(request, buffers, timing)
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()  # now, not at garbage collection: that is what sends ABORT
            if timing.finish_reason == "abort" and outcome is not None:
                timing.finish_reason = outcome() or "abort"
            if self.metrics is not None and timing.engine:
                self.metrics.record_request(timing, time.time())

    async def _generate(
        self, request: AddRequest, buffers: list[bytes] | None, timing: RequestTiming
    ) -> AsyncGenerator[RequestDelta, None]:
        # Encoded before any routing state exists: a request the wire cannot carry leaks nothing.
        frames = encode(request, buffers or [])
        tried: set[int] = set()
        conn = self.pick_engine(request.prompt_token_ids)
        got_tokens = False
        while True:
            timing.engine = conn.ready.engine_id if conn.ready else conn.address
            queue: DeltaMailbox[EngineLost] = DeltaMailbox()
            conn.pending[request.request_id] = queue
            conn.num_served += 1
            tried.add(conn.index)
            lost: EngineLost | None = None
            finished = False
            if not self._send_frames(conn, frames):
                # Fail (or move) it now rather than wait for the heartbeat timeout to notice.
                logger.warning("could not send request %s to engine %s", request.request_id, conn.address)
                queue.put_nowait(EngineLost("the request could not be sent to the engine"))
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, EngineLost):
                        lost, finished = item, True
                        break
                    if _refused_for_now(item) and not got_tokens:
                        # Full queue or draining: another engine may well take it.
                        refusal = item.error or "the engine refused the request"
                        lost, finished = EngineLost(refusal, public=refusal), True
                        break
                    got_tokens = got_tokens or bool(item.new_token_ids)
                    finished = item.finish_reason is not None
                    timing.observe(item, time.time())
                    if item.finish_reason is not None:
                        timing.finish_reason = FINISH_REASON_NAMES[FinishReason(item.finish_reason)]
                    yield item
                    if finished:
                        return
            finally:
                conn.pending.pop(request.request_id, None)
                if not finished:
                    self._send(conn, Abort([request.request_id]))
            if lost is None:
                lost = EngineLost("the engine was lost")
            if got_tokens:
                timing.finish_reason = "error"
                yield _lost_delta(request.request_id, lost)
                return
            try:
                conn = self.pick_engine(request.prompt_token_ids, exclude=tried)
            except EngineUnavailable:
                timing.finish_reason = "error"
                yield _lost_delta(request.request_id, lost)
                return
            self.num_retries += 1
            logger.warning("retrying request %s on engine %s", request.request_id, conn.address)

    def abort(self, request_ids: list[str]) -> None:
        for conn in self.engines:
            ids = [r for r in request_ids if r in conn.pending]
            if ids:
                self._send(conn, Abort(ids))


def _refused_for_now(delta: RequestDelta) -> bool:
    return delta.finish_reason == FinishReason.ERROR and delta.error_status == 503


def _lost_delta(request_id: str, lost: EngineLost) -> RequestDelta:
    # The reason names engines and their failures: the log gets it, the client a public sentence.
    logger.warning("request %s ended: %s", request_id, lost.reason)
    return RequestDelta(request_id, [], finish_reason=FinishReason.ERROR, error=lost.public, error_status=503)
