"""The API process's side of the wire: one DEALER socket per engine, read from the event loop, heartbeats,
routing by least outstanding work, and per-request delta queues. Engines that die or go silent are
marked down; their requests end with an explicit error or, with no token yet, are retried elsewhere."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from contract.finish_reasons import FINISH_REASON_NAMES
from frontend.delta_mailbox import DeltaMailbox
from frontend.errors import ENGINE_LOST_MESSAGE
from frontend.lora_ops import LoraOps
from frontend.request_timing import RequestMetricsSink, RequestTiming
from frontend.zmq_reader import SocketReader
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
    LoadLora,
    LoraAdapter,
    LoraResult,
    Outputs,
    Ready,
    Refused,
    RequestDelta,
    SchedulerStats,
    UnloadLora,
)

logger = logging.getLogger(__name__)

_PREFIX_AFFINITY_TOKENS = 64  # requests whose first tokens match prefer the engine that served them
_AFFINITY_SLACK = 4  # ...unless that engine has this many more outstanding requests than the least loaded
_HELLO_RETRY_S = 2.0  # how often a down engine is asked for a handshake again
# Socket events: a peer process that dies closes its connection at once, long before heartbeats miss.
_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0)


# What the engine answers when its waiting queue is full (engine/stepper.py), said here too when this
# process can tell before sending.
QUEUE_FULL = "the engine's waiting queue is full"


@dataclass(frozen=True)
class EngineLost:
    """Put on a request's queue when its engine dies or goes silent."""

    reason: str  # for the log
    public: str = ENGINE_LOST_MESSAGE  # for the client


@dataclass
class EngineConnection:
    address: str
    index: int
    socket: zmq.Socket | None = None
    ready: Ready | None = None
    alive: bool = False
    refused: str | None = None
    last_heard: float = 0.0
    stats: SchedulerStats | None = None
    pending: dict[str, DeltaMailbox[EngineLost]] = field(default_factory=dict)
    reader: SocketReader | None = None  # the socket's messages, read from the event loop
    monitor: SocketReader | None = None  # its connection events
    num_served: int = 0
    last_hello: float = 0.0
    # The model this engine serves: its announced first served name (engines of one model share it).
    group: str | None = None
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)  # LoRA adapters it holds, by name

    @property
    def load(self) -> int:
        reported = (self.stats.num_running + self.stats.num_waiting) if self.stats else 0
        return max(len(self.pending), reported)


class EngineUnavailable(Exception):
    """No live engine can take the request."""


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
        # Plain sockets, read by SocketReader from the event loop (cheaper per message than zmq.asyncio).
        self.ctx = zmq.Context()
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
        # Called after an engine's handshake or adapter list changed (the app rebuilds its model table).
        self.on_engine_change: Callable[[EngineConnection], None] | None = None
        self._lora_ops = LoraOps()

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
        sock: zmq.Socket = self.ctx.socket(zmq.DEALER)
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
        conn.reader = SocketReader(sock, lambda frames: self._on_frames(conn, frames), conn.address)
        conn.monitor = SocketReader(
            monitor, lambda frames: self._on_monitor_event(conn, sock, frames), conn.address
        )
        conn.last_hello = time.monotonic()
        self._send(conn, Hello(PROTOCOL_VERSION, self.client_name))

    def _close_socket(self, conn: EngineConnection) -> None:
        if conn.reader is not None:
            conn.reader.close()
        if conn.monitor is not None:
            conn.monitor.close()
            conn.monitor.sock.close(0)
        conn.reader = conn.monitor = None
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
            conn.socket.send_multipart(frames, flags=zmq.NOBLOCK)  # zmq.Again: no connected peer
        except zmq.ZMQError:
            return False
        finally:
            if conn.reader is not None:
                conn.reader.after_send()
        return True

    # -- receiving ------------------------------------------------------------------------------------
    def _on_frames(self, conn: EngineConnection, frames: list[bytes]) -> None:
        try:
            message, _extra = decode(frames)
        except FrameError as exc:
            self.num_bad_messages += 1
            self._bad_message_warning.warn(
                "dropped an undecodable message from engine %s: %.300s", conn.address, exc
            )
            return
        conn.last_heard = time.monotonic()
        self._dispatch(conn, message)

    def _on_monitor_event(self, conn: EngineConnection, sock: zmq.Socket, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        if conn.socket is not sock:
            return  # a newer socket took over this engine
        if event["event"] == zmq.EVENT_DISCONNECTED and conn.alive:
            self._mark_dead(conn, f"engine {conn.address} closed its connection")
            return
        if event["event"] != zmq.EVENT_DISCONNECTED and conn.refused is None:
            conn.refused = "CurveZMQ authentication failed: the engine does not accept this client key"
            logger.error("engine %s: %s", conn.address, conn.refused)

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
            conn.group = message.served_model_names[0] if message.served_model_names else conn.address
            conn.adapters = {a.name: a for a in message.lora_adapters}
            self._notify(conn)
            self._ready_event.set()
        elif isinstance(message, LoraResult):
            # Sent to every API process: the asker resolves its operation, everyone takes the new list.
            conn.adapters = {a.name: a for a in message.adapters}
            self._lora_ops.resolve(message)
            self._notify(conn)
        elif isinstance(message, Refused):
            conn.refused = message.reason
            logger.error("engine %s refused this API process: %s", conn.address, message.reason)
        elif isinstance(message, EngineDead):
            logger.error("engine %s reported a fatal error: %s", conn.address, message.message)
            self._mark_dead(conn, f"engine failed: {message.message}")

    def _notify(self, conn: EngineConnection) -> None:
        if self.on_engine_change is not None:
            try:
                self.on_engine_change(conn)
            except Exception:  # a bad handshake must not stop this engine's receive loop
                logger.exception("could not take in engine %s's model information", conn.address)

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
        self._lora_ops.fail_engine(conn, reason)
        # A fresh socket drops anything queued for the dead peer, so a restarted engine never runs stale work.
        self._close_socket(conn)
        self._open(conn)

    # -- requests -------------------------------------------------------------------------------------
    def pick_engine(
        self,
        prompt_token_ids: list[int],
        exclude: set[int] | None = None,
        *,
        group: str | None = None,
        lora_name: str | None = None,
    ) -> EngineConnection:
        """The live engine for a request: of the model `group` (None: any) and holding the adapter
        `lora_name` (None: base model), least loaded, preferring the one that saw the same prefix."""
        live = [
            c
            for c in self.engines
            if c.alive
            and (group is None or c.group == group)
            and (not exclude or c.index not in exclude)
            and (lora_name is None or lora_name in c.adapters)
        ]
        if not live:
            raise EngineUnavailable("no engine is available")
        least = min(live, key=lambda c: c.load)
        key = tuple(prompt_token_ids[:_PREFIX_AFFINITY_TOKENS])
        if len(key) == _PREFIX_AFFINITY_TOKENS:
            # One table for all models: an entry pointing at another model's engine is not among `live`,
            # so it is ignored and overwritten (keying by model too cost ~1 us per request).
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
        timing: RequestTiming | None = None,
        group: str | None = None,
        model_name: str = "",
    ) -> AsyncGenerator[RequestDelta, None]:
        """Deltas for one request until it finishes. Closing the iterator early aborts it on the engine.

        `timing` is the caller's metrics record of this request (`request_timing`), or None for a new
        one; a caller that ends the request by its own rule (a stop string) sets its `finish_reason`
        before closing, so the metrics count it as such instead of as an abort. `group` is the model
        whose engines may run it (None: any engine), `model_name` its metrics label.
        """
        if timing is None:
            timing = request_timing(request, model_name)
        deltas = self._generate(request, buffers, timing, group)
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()  # now, not at garbage collection: that is what sends ABORT
            if self.metrics is not None and timing.engine:
                self.metrics.record_request(timing, time.time())

    async def _generate(
        self, request: AddRequest, buffers: list[bytes] | None, timing: RequestTiming, group: str | None
    ) -> AsyncGenerator[RequestDelta, None]:
        # Encoded before any routing state exists: a request the wire cannot carry leaks nothing.
        frames = encode(request, buffers or [])
        tried: set[int] = set()
        lora_name = request.lora_name
        conn = self.pick_engine(request.prompt_token_ids, group=group, lora_name=lora_name)
        full: set[int] = set()
        while _surely_full(conn):
            # Full by this process's own count alone (prefix affinity may have picked it): another engine,
            # or a refusal now instead of after the engine's step in progress (tens of seconds under
            # overload, benchmarks/RESULTS.md).
            full.add(conn.index)
            try:
                conn = self.pick_engine(request.prompt_token_ids, full, group=group, lora_name=lora_name)
            except EngineUnavailable:
                timing.engine = conn.ready.engine_id if conn.ready else conn.address
                timing.finish_reason = "error"
                yield _lost_delta(request.request_id, EngineLost("every engine's queue is full", QUEUE_FULL))
                return
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
                conn = self.pick_engine(
                    request.prompt_token_ids, exclude=tried, group=group, lora_name=lora_name
                )
            except EngineUnavailable:
                timing.finish_reason = "error"
                yield _lost_delta(request.request_id, lost)
                return
            self.num_retries += 1
            logger.warning("retrying request %s on engine %s", request.request_id, conn.address)

    # -- LoRA adapters --------------------------------------------------------------------------------
    async def lora_op(
        self, conns: Sequence[EngineConnection], message: LoadLora | UnloadLora, timeout_s: float
    ) -> list[LoraResult]:
        """Sends a LoadLora / UnloadLora to each engine (each under its own op id) and waits for every
        LoraResult. An engine that is lost or does not answer in time gives a result with status 503."""
        return await self._lora_ops.run(conns, message, timeout_s, self._send_frames)

    def abort(self, request_ids: list[str]) -> None:
        for conn in self.engines:
            ids = [r for r in request_ids if r in conn.pending]
            if ids:
                self._send(conn, Abort(ids))


def request_timing(request: AddRequest, model_name: str = "", n: int = 1) -> RequestTiming:
    """A fresh metrics record of one engine request; `n`: the API request's number of choices."""
    return RequestTiming(
        request.arrival_time,
        model_name=model_name,
        num_prompt_tokens=len(request.prompt_token_ids),
        max_tokens=request.sampling.max_tokens,
        n=n,
    )


def _surely_full(conn: EngineConnection) -> bool:
    """Whether the engine would refuse one more request: this process's own requests on it exceed what
    it runs at once plus its waiting limit. A lower bound on the engine's queue (other API processes add
    to it), so it never refuses what the engine would take, bar a finished request whose last delta is
    still on the wire."""
    ready = conn.ready
    if (
        ready is None
        or ready.task != "generate"
        or not ready.max_num_seqs
        or ready.max_waiting_requests is None
    ):
        return False
    return len(conn.pending) >= ready.max_num_seqs + ready.max_waiting_requests


def _refused_for_now(delta: RequestDelta) -> bool:
    return delta.finish_reason == FinishReason.ERROR and delta.error_status == 503


def _lost_delta(request_id: str, lost: EngineLost) -> RequestDelta:
    # The reason names engines and their failures: the log gets it, the client a public sentence.
    logger.warning("request %s ended: %s", request_id, lost.reason)
    return RequestDelta(request_id, [], finish_reason=FinishReason.ERROR, error=lost.public, error_status=503)
