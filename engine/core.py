"""The engine core process loop: take inputs -> run one step -> send deltas, over ZeroMQ.

Runs on the main thread of an engine process; socket work happens on EngineIO's threads and the
step logic lives in EngineStepper (shared with the offline LLM API).
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec

from engine.config import EngineConfig
from engine.embedding_runner import EmbeddingParts, EmbeddingStepper, build_embedding_parts
from engine.engine_setup import EngineParts, build_engine_parts
from engine.io import EngineIO
from engine.step_protocol import Stepper, error_delta
from engine.stepper import EngineStepper
from protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    AddRequest,
    EngineDead,
    Heartbeat,
    Hello,
    LoadLora,
    LoraResult,
    Outputs,
    Refused,
    RequestDelta,
    SchedulerStats,
    UnloadLora,
)

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, parts: EngineParts | None = None) -> None:
        self.config = config
        curve_keys = _curve_keys(config)  # before the model loads, so a missing key file fails fast
        self.parts: EngineParts | EmbeddingParts
        self.stepper: Stepper
        # Admission control is always on: Ready carries the flag's bound or the one from the KV cache.
        if parts is None and config.task == "embed":
            self.parts = build_embedding_parts(config)
            self.stepper = EmbeddingStepper(
                self.parts, max_waiting_requests=self.parts.ready.max_waiting_requests
            )
        else:
            self.parts = parts or build_engine_parts(config)
            self.stepper = EngineStepper(
                self.parts, max_waiting_requests=self.parts.ready.max_waiting_requests
            )
        self.tp_workers = getattr(self.parts, "tp_workers", None)
        if self.tp_workers is not None:
            self.tp_workers.on_fatal = self._report_death  # a lost rank ends the engine, loudly
        self.io = EngineIO(
            config.listen,
            heartbeat_interval_s=config.heartbeat_interval_s,
            **curve_keys,
        )
        self.known_clients: set[bytes] = set()
        self.draining = False
        self.stop_event = threading.Event()
        self._last_housekeeping = 0.0
        self._handlers: dict[type[Any], Callable[[bytes, Any, list[Any]], None]] = {
            Hello: self._on_hello,
            AddRequest: self._on_add,
            Abort: self._on_abort,
            Heartbeat: self._on_heartbeat,
            LoadLora: self._on_load_lora,
            UnloadLora: self._on_unload_lora,
        }

    # -- lifecycle ------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def drain(signum: int, _frame: Any) -> None:
            running = self._stats().num_running
            logger.info("signal %d: refusing new work and draining %d running requests", signum, running)
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
                self._take_inputs(block=not self.stepper.has_work)
                if self.stepper.has_work:
                    self._step()
                self._housekeeping()
                if self.draining and not self.stepper.has_work:
                    break
        except Exception as exc:
            logger.exception("engine core failed")
            for client in list(self.io.clients):
                self.io.send(client, EngineDead(self.config.engine_id, f"{type(exc).__name__}: {exc}"))
            time.sleep(0.2)  # let the outbox flush
            raise
        finally:
            if self.tp_workers is not None:
                self.tp_workers.stop()
            self.io.close()

    def _report_death(self, reason: str) -> None:
        """Called from any thread just before the process exits: API processes fail their requests now
        instead of waiting for missed heartbeats."""
        for client in list(self.io.clients):
            self.io.send(client, EngineDead(self.config.engine_id, reason))
        time.sleep(0.2)  # let the outbox flush

    # -- inputs ---------------------------------------------------------------------------------------
    def _take_inputs(self, block: bool) -> None:
        try:
            timeout = self.config.heartbeat_interval_s
            item = self.io.inputs.get(timeout=timeout) if block else self.io.inputs.get_nowait()
        except queue.Empty:
            return
        while True:
            client_id, message, frames = item
            handler = self._handlers.get(type(message))
            if handler is not None:
                self._handle(handler, client_id, message, frames)
            try:
                item = self.io.inputs.get_nowait()
            except queue.Empty:
                return

    def _handle(self, handler: Any, client_id: bytes, message: Any, frames: list[bytes]) -> None:
        """Nothing a peer sends may end the engine: a message whose handling fails is logged, and an ADD
        is answered with an error for that request alone."""
        try:
            handler(client_id, message, frames)
        except Exception:
            logger.exception("failed to handle a %s message from a peer", type(message).__name__)
            if isinstance(message, AddRequest):
                error = error_delta(message.request_id, "The engine could not read this request.", 400)
                self.io.send(client_id, Outputs(self.config.engine_id, [error], self._stats()))

    def _on_hello(self, client_id: bytes, message: Hello, _frames: list[bytes]) -> None:
        if message.protocol_version != PROTOCOL_VERSION:
            reason = (
                f"protocol version {message.protocol_version} is not supported; "
                f"this engine speaks {PROTOCOL_VERSION}"
            )
            self.io.send(client_id, Refused(reason))
            return
        if client_id not in self.known_clients:
            self.known_clients.add(client_id)
            logger.info("API process %r connected", message.client_name)
        self.io.send(client_id, self.parts.ready)

    def _stats(self) -> SchedulerStats:
        """The stepper's figures plus the transport's own (messages it could not decode)."""
        return msgspec.structs.replace(self.stepper.stats(), num_bad_messages=self.io.num_bad_messages)

    def _on_heartbeat(self, client_id: bytes, _message: Heartbeat, _frames: list[bytes]) -> None:
        return None  # the socket thread already recorded when we last heard from this client

    def _on_abort(self, client_id: bytes, message: Abort, _frames: list[bytes]) -> None:
        self.stepper.abort(message.request_ids)

    def _on_add(self, client_id: bytes, message: AddRequest, frames: list[bytes]) -> None:
        if self.draining:
            rejection: RequestDelta | None = error_delta(
                message.request_id, "the engine is shutting down", 503
            )
        else:
            rejection = self.stepper.add(message, client_id, frames)
        if rejection is not None:
            self.io.send(client_id, Outputs(self.config.engine_id, [rejection], self._stats()))

    # -- LoRA adapters at run time --------------------------------------------------------------------
    def _on_load_lora(self, client_id: bytes, message: LoadLora, _frames: list[bytes]) -> None:
        self._lora_op(client_id, message.op_id, lambda lora: lora.load(message.adapter))

    def _on_unload_lora(self, client_id: bytes, message: UnloadLora, _frames: list[bytes]) -> None:
        self._lora_op(client_id, message.op_id, lambda lora: lora.unload(message.name))

    def _lora_op(self, client_id: bytes, op_id: str, op: Callable[[Any], object]) -> None:
        """Runs a load/unload between steps and tells every API process the outcome and the new adapter
        list (the asker matches op_id). A failed load leaves the registry, and running requests, as
        they were."""
        from engine.lora.adapter import LoraError
        from engine.lora.manager import LORA_DISABLED

        lora = getattr(self.parts, "lora", None)  # embedding engines have no LoRA
        error: str | None = None
        status = 400
        if lora is None:
            error = LORA_DISABLED
        else:
            try:
                op(lora)
            except LoraError as exc:
                error, status = str(exc), exc.status
            except Exception:
                logger.exception("LoRA operation %r failed", op_id)
                error, status = "The engine failed to change its adapters; the details are in its log.", 500
        adapters = list(lora.adapters.values()) if lora is not None else []
        if lora is not None:
            # API processes that connect later learn the current list from READY.
            self.parts.ready = msgspec.structs.replace(self.parts.ready, lora_adapters=adapters)
        result = LoraResult(op_id, self.config.engine_id, adapters, error=error, error_status=status)
        for client in self.known_clients | {client_id}:
            self.io.send(client, result)

    # -- one step -------------------------------------------------------------------------------------
    def _step(self) -> None:
        try:
            deltas = self.stepper.step()
        except Exception:
            # The model step isolates its own failures; this is a bug elsewhere in the step (the
            # scheduler, say). Failing the requests in flight beats taking the engine down with them.
            logger.exception("engine step failed; failing every request in flight")
            deltas = self.stepper.fail_all()
        if not deltas and not self.stepper.last_step_had_work:
            time.sleep(0.001)  # nothing fits right now; let inputs (aborts) arrive
            return
        per_client: dict[bytes, list[RequestDelta]] = defaultdict(list)
        for client_id, delta in deltas:
            per_client[client_id].append(delta)
        stats = self._stats()
        self.io.stats = stats
        for client_id, client_deltas in per_client.items():
            self.io.send(client_id, Outputs(self.config.engine_id, client_deltas, stats))

    # -- dead clients ----------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < self.config.heartbeat_interval_s:
            return
        self._last_housekeeping = now
        self.io.stats = self._stats()
        for client_id, last_seen in list(self.io.clients.items()):
            if now - last_seen > self.config.client_timeout_s:
                self._drop_client(client_id)

    def _drop_client(self, client_id: bytes) -> None:
        self.io.forget_client(client_id)
        self.known_clients.discard(client_id)
        num_aborted = self.stepper.abort_client(client_id)
        if num_aborted:
            logger.warning("an API process went silent; aborted its %d requests", num_aborted)


def _curve_keys(config: EngineConfig) -> dict[str, Any]:
    """EngineIO's Curve arguments, all read from the keys folder in this one place."""
    if not config.curve_keys_dir:
        return {}
    from protocol.curve import load_allowed_client_keys, load_server_keys

    public, secret = load_server_keys(config.curve_keys_dir)
    return {
        "curve_public_key": public,
        "curve_secret_key": secret,
        "curve_allowed_client_keys": load_allowed_client_keys(config.curve_keys_dir),
    }
