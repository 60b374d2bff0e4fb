"""The engine core: a busy loop over (take inputs -> schedule -> run the model -> send deltas).

Runs on the main thread of an engine process; socket work happens on EngineIO's threads.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import defaultdict
from typing import Any

from engine.config import EngineConfig
from engine.engine_setup import EngineParts, build_engine_parts
from engine.io import EngineIO
from engine.request import Request
from engine.request_intake import RequestRejected, make_request
from protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    AddRequest,
    EngineDead,
    FinishReason,
    Heartbeat,
    Hello,
    Outputs,
    Refused,
    RequestDelta,
    SchedulerStats,
    TokenLogprob,
)

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, parts: EngineParts | None = None) -> None:
        self.config = config
        self.parts = parts or build_engine_parts(config)
        self.scheduler = self.parts.scheduler
        self.runner = self.parts.runner
        self.io = EngineIO(
            config.listen, heartbeat_interval_s=config.heartbeat_interval_s, **self.parts.curve_keys
        )
        self.known_clients: set[bytes] = set()
        self.owner: dict[str, bytes] = {}  # request_id -> identity of the API process that sent it
        self.step_count = 0
        self.max_step_num_seqs = 0
        self.last_step_num_seqs = 0
        self.last_step_num_tokens = 0
        self.draining = False
        self.stop_event = threading.Event()
        self._last_heartbeat = 0.0
        self._handlers = {
            Hello: self._on_hello,
            AddRequest: self._on_add,
            Abort: self._on_abort,
            Heartbeat: self._on_heartbeat,
        }

    # -- lifecycle ------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def drain(signum: int, _frame: Any) -> None:
            logger.info(
                "signal %d: refusing new work and draining %d running requests",
                signum,
                self.scheduler.num_running,
            )
            if self.draining:
                self.stop_event.set()
            self.draining = True

        signal.signal(signal.SIGTERM, drain)
        signal.signal(signal.SIGINT, drain)

    def run(self) -> None:
        self.io.start()
        logger.info("engine %s listening on %s", self.config.engine_id, self.config.listen)
        try:
            while not self.stop_event.is_set():
                self._take_inputs(block=not self.scheduler.has_work)
                if self.scheduler.has_work:
                    self._step()
                self._housekeeping()
                if self.draining and not self.scheduler.has_work:
                    break
        except Exception as exc:
            logger.exception("engine core failed")
            for client in list(self.io.clients):
                self.io.send(client, EngineDead(self.config.engine_id, f"{type(exc).__name__}: {exc}"))
            time.sleep(0.2)  # let the outbox flush
            raise
        finally:
            self.io.close()

    # -- inputs ---------------------------------------------------------------------------------------
    def _take_inputs(self, block: bool) -> None:
        try:
            item = (
                self.io.inputs.get(timeout=self.config.heartbeat_interval_s)
                if block
                else self.io.inputs.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            client_id, message, frames = item
            handler = self._handlers.get(type(message))
            if handler is not None:
                handler(client_id, message, frames)
            try:
                item = self.io.inputs.get_nowait()
            except queue.Empty:
                return

    def _on_hello(self, client_id: bytes, message: Hello, _frames: list[bytes]) -> None:
        if message.protocol_version != PROTOCOL_VERSION:
            reason = f"protocol version {message.protocol_version} is not supported; this engine speaks {PROTOCOL_VERSION}"
            self.io.send(client_id, Refused(reason))
            return
        if client_id not in self.known_clients:
            self.known_clients.add(client_id)
            logger.info("API process %r connected", message.client_name)
        self.io.send(client_id, self.parts.ready)

    def _on_heartbeat(self, client_id: bytes, _message: Heartbeat, _frames: list[bytes]) -> None:
        return None  # last-seen time is already recorded

    def _on_abort(self, client_id: bytes, message: Abort, _frames: list[bytes]) -> None:
        for request in self.scheduler.abort_requests(message.request_ids):
            self._forget(request)

    def _reject(self, client_id: bytes, request_id: str, error: str, status: int) -> None:
        delta = RequestDelta(
            request_id, [], finish_reason=FinishReason.ERROR, error=error, error_status=status
        )
        self.io.send(client_id, Outputs(self.config.engine_id, [delta], self._stats()))

    def _on_add(self, client_id: bytes, message: AddRequest, frames: list[bytes]) -> None:
        if self.draining:
            self._reject(client_id, message.request_id, "the engine is shutting down", 503)
            return
        limit = self.config.max_waiting_requests
        if limit is not None and self.scheduler.num_waiting >= limit:
            self._reject(client_id, message.request_id, "the engine's waiting queue is full", 503)
            return
        if message.request_id in self.owner:
            self._reject(
                client_id, message.request_id, f"request id {message.request_id!r} is already running", 400
            )
            return
        try:
            request = make_request(message, client_id, frames, self.parts)
        except RequestRejected as exc:
            self._reject(client_id, message.request_id, str(exc), 400)
            return
        self.owner[request.request_id] = client_id
        self.scheduler.add_request(request)

    # -- one step -------------------------------------------------------------------------------------
    def _step(self) -> None:
        out = self.scheduler.schedule()
        if out.is_empty:
            time.sleep(0.001)  # nothing fits right now; let inputs (aborts) arrive
            return
        self.step_count += 1
        self.last_step_num_seqs = len(out.scheduled)
        self.last_step_num_tokens = out.num_tokens
        self.max_step_num_seqs = max(self.max_step_num_seqs, self.last_step_num_seqs)
        try:
            result = self.runner.execute(out)
        except Exception as exc:
            logger.exception("model step failed; failing the %d requests in it", len(out.scheduled))
            self._fail_step(out.scheduled, f"{type(exc).__name__}: {exc}")
            return
        finished = self.scheduler.update_after_step(out, result.sampled)
        per_client: dict[bytes, list[RequestDelta]] = defaultdict(list)
        finished_ids = {r.request_id for r in finished}
        for request, _ in out.scheduled:
            token_id = result.sampled.get(request.request_id)
            if token_id is None or (request.is_finished and request.request_id not in finished_ids):
                continue
            lp = result.logprobs.get(request.request_id)
            delta = RequestDelta(
                request.request_id,
                [token_id],
                finish_reason=request.finish_reason,
                stop_reason=request.stop_reason,
                num_cached_tokens=request.num_cached_tokens or 0,
                logprobs=[TokenLogprob(token_id, lp[0], lp[1], lp[2], lp[3])] if lp else None,
                num_prompt_tokens=request.num_prompt_tokens,
            )
            per_client[request.client_id].append(delta)
        stats = self._stats()
        self.io.stats = stats
        for client_id, deltas in per_client.items():
            self.io.send(client_id, Outputs(self.config.engine_id, deltas, stats))
        for request in finished:
            self._forget(request)

    def _fail_step(self, scheduled: list[tuple[Request, int]], error: str) -> None:
        for request, _ in scheduled:
            self.scheduler.finish_with_error(request)
            delta = RequestDelta(
                request.request_id, [], finish_reason=FinishReason.ERROR, error=error, error_status=500
            )
            self.io.send(request.client_id, Outputs(self.config.engine_id, [delta], self._stats()))
            self._forget(request)

    def _forget(self, request: Request) -> None:
        self.owner.pop(request.request_id, None)
        self.runner.sampler.forget(request.request_id)

    # -- heartbeats and dead clients -------------------------------------------------------------------
    def _stats(self) -> SchedulerStats:
        kv = self.scheduler.kv_cache
        return SchedulerStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=kv.usage,
            step=self.step_count,
            num_scheduled_seqs=self.last_step_num_seqs,
            num_scheduled_tokens=self.last_step_num_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.num_queried_tokens,
            prefix_cache_hits=kv.num_hit_tokens,
            max_step_num_seqs=self.max_step_num_seqs,
            num_free_blocks=kv.num_free_blocks,
            num_bad_messages=self.io.num_bad_messages,
        )

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < self.config.heartbeat_interval_s:
            return
        self._last_heartbeat = now
        self.io.stats = self._stats()
        for client_id, last_seen in list(self.io.clients.items()):
            if now - last_seen > self.config.client_timeout_s:
                self._drop_client(client_id)

    def _drop_client(self, client_id: bytes) -> None:
        self.io.forget_client(client_id)
        self.known_clients.discard(client_id)
        orphans = [rid for rid, owner in self.owner.items() if owner == client_id]
        if orphans:
            logger.warning("API process went silent; aborting its %d requests", len(orphans))
        for request in self.scheduler.abort_requests(orphans):
            self._forget(request)
