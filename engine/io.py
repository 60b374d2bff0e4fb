"""The engine's socket side: one thread owns the ROUTER socket (recv + decode, and forwarding of
encoded outputs), another encodes outputs, so serialization overlaps the forward pass."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Any

import zmq

from protocol.framing import FrameError, decode, encode
from protocol.log_limit import RateLimitedWarning
from protocol.messages import Heartbeat, SchedulerStats

logger = logging.getLogger(__name__)
# A peer sending garbage in a loop must not fill the disk with our log lines.
_bad_message_warning = RateLimitedWarning(logger)

_OUTBOX = "inproc://tandem-engine-outbox"


class EngineIO:
    def __init__(
        self,
        address: str,
        *,
        heartbeat_interval_s: float = 1.0,
        curve_secret_key: bytes | None = None,
        curve_public_key: bytes | None = None,
        curve_allowed_client_keys: list[bytes] | None = None,
    ) -> None:
        self.address = address
        self.heartbeat_interval_s = heartbeat_interval_s
        # identity -> monotonic time of its last message; written by the socket thread only.
        self.clients: dict[bytes, float] = {}
        self.stats: SchedulerStats | None = None  # latest stats, published by the engine loop
        self.inputs: queue.Queue[tuple[bytes, Any, list[bytes]]] = queue.Queue()
        self._outputs: queue.Queue[tuple[bytes, Any, list[bytes]] | None] = queue.Queue()
        self._ctx = zmq.Context()
        self._curve = (curve_secret_key, curve_public_key) if curve_secret_key else None
        self._allowed_client_keys = frozenset(curve_allowed_client_keys or ())
        self._authenticator: Any = None
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._bind_error: Exception | None = None
        self.num_bad_messages = 0
        self._threads = [
            threading.Thread(target=self._socket_loop, name="engine-socket", daemon=True),
            threading.Thread(target=self._encode_loop, name="engine-encode", daemon=True),
        ]

    def start(self) -> None:
        self._threads[0].start()
        self._bound.wait()
        if self._bind_error is not None:
            raise self._bind_error
        self._threads[1].start()
        _notify_systemd_ready()

    def forget_client(self, client_id: bytes) -> None:
        self.clients.pop(client_id, None)

    def send(self, client_id: bytes, message: Any, buffers: list[bytes] | None = None) -> None:
        self._outputs.put((client_id, message, buffers or []))

    def close(self) -> None:
        self._outputs.put(None)
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=2)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._ctx.destroy(linger=0)

    def _start_authenticator(self) -> None:
        """ZAP handler: without one, a Curve server accepts any client key that knows the server key."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("engine.zap"))
        auth.start()
        auth.configure_curve_callback("tandem", credentials_provider=_AllowedKeys(self._allowed_client_keys))
        self._authenticator = auth

    def _make_router(self) -> zmq.Socket:
        if self._curve:
            self._start_authenticator()
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.SNDHWM, 0)
        if self._curve:
            router.curve_server = True
            router.curve_secretkey, router.curve_publickey = self._curve
            router.zap_domain = b"tandem"
        router.bind(self.address)
        return router

    def _socket_loop(self) -> None:
        try:
            router = self._make_router()
            outbox = self._ctx.socket(zmq.PULL)
            outbox.bind(_OUTBOX)
        except Exception as exc:  # reported to start()'s caller
            self._bind_error = exc
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(100))
            now = time.monotonic()
            if now >= next_beat:
                # Beats come from this thread, so a long model step never looks like a dead engine.
                next_beat = now + self.heartbeat_interval_s
                beat = encode(Heartbeat(time.time(), self.stats))
                for client_id in list(self.clients):
                    router.send_multipart([client_id, *beat])
            if router in events:
                self._receive(router)
            if outbox in events:
                while True:
                    try:
                        frames = outbox.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    router.send_multipart(frames)
        router.close(0)
        outbox.close(0)

    def _receive(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            client_id, body = frames[0], frames[1:]
            self.clients[client_id] = time.monotonic()
            try:
                message, extra = decode(body)
            except FrameError as exc:
                self.num_bad_messages += 1
                _bad_message_warning.warn("dropped an undecodable message from a peer: %.300s", exc)
                continue
            except Exception as exc:  # decode has no other failure we know of; this thread must not die
                self.num_bad_messages += 1
                _bad_message_warning.warn("dropped a message that broke the decoder: %r", exc)
                continue
            self.inputs.put((client_id, message, [bytes(b) for b in extra]))

    def _encode_loop(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.connect(_OUTBOX)
        while True:
            item = self._outputs.get()
            if item is None:
                break
            client_id, message, buffers = item
            try:
                frames = encode(message, buffers)
            except Exception:  # one unencodable output is lost, not every later one
                logger.exception("could not encode a %s for a peer", type(message).__name__)
                continue
            push.send_multipart([client_id, *frames])
        push.close(0)


def _notify_systemd_ready() -> None:
    """Type=notify units (deploy/systemd/) count the engine as started once its socket is bound."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", path)
    except OSError as exc:
        logger.warning("could not notify systemd of readiness: %s", exc)


class _AllowedKeys:
    """ZAP credentials check: a client may connect only with one of the listed Z85 public keys."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, _domain: str, client_key: bytes) -> bool:
        allowed = client_key in self.keys
        if not allowed:
            logger.warning("refused a CurveZMQ client with an unknown public key")
        return allowed
