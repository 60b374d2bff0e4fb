"""Reads a plain (blocking-API) ZeroMQ socket from the asyncio event loop's own selector: each message is
handed to a callback straight from the loop, with no future, task switch or await per message as
zmq.asyncio has (its wrapper was ~15% of the API process's time per streamed request)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

logger = logging.getLogger(__name__)

# Messages handled per loop callback before other callbacks get a turn (a flood must not stall the loop).
_BATCH = 256


class SocketReader:
    """Calls `on_message(frames)` for every multipart message `sock` receives, until `close()`.

    ZeroMQ's FD signals edges, not levels: it becomes readable when the socket's state may have changed,
    so each wake-up drains every waiting message, and a send on the socket (which can consume the edge
    that announced an arrival) must be followed by `after_send()`."""

    def __init__(
        self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None], name: str = "socket"
    ) -> None:
        self.sock = sock
        self.on_message = on_message
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.fd = int(sock.getsockopt(zmq.FD))
        self.closed = False
        self._scheduled = False
        self.loop.add_reader(self.fd, self._drain)
        self._schedule()  # a message may have arrived before the reader was registered

    def after_send(self) -> None:
        if self.closed or self._scheduled:
            return
        try:
            readable = int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN
        except zmq.ZMQError:  # the socket was closed without close() here
            self.close()
            return
        if readable:
            self._schedule()

    def close(self) -> None:
        """Stops reading; call before closing the socket (its FD is unregistered here)."""
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)

    def _schedule(self) -> None:
        self._scheduled = True
        self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        for _ in range(_BATCH):
            if self.closed:
                return
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed under us
                return
            try:
                self.on_message(frames)
            except Exception:  # one bad message must not stop the reading
                logger.exception("failed to handle a message from %s", self.name)
        if not self.closed and not self._scheduled:
            self._schedule()  # more may be waiting: continue after the loop's other callbacks
