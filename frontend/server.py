"""Runs one API process: uvicorn serving the Starlette app, on a host/port or an inherited socket."""

from __future__ import annotations

import logging
import math
import socket
import threading
from types import FrameType

import uvicorn

from frontend.app import build_app
from frontend.config import FrontendConfig


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, stop_requested: threading.Event) -> None:
        super().__init__(config)
        self.stop_requested = stop_requested

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop_requested.set()  # also ends a start-up still waiting for an engine
        super().handle_exit(sig, frame)


def run_api_server(config: FrontendConfig) -> int:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s [api] %(name)s: %(message)s"
    )
    app = build_app(config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        fd=None,
        log_level=config.log_level,
        access_log=False,  # RequestMiddleware logs each request, with its id (unless --disable-log-requests)
        # SIGTERM: stop accepting, let in-flight requests finish for this long, then cancel them.
        timeout_graceful_shutdown=math.ceil(config.shutdown_timeout_s),
        lifespan="on",
        ssl_certfile=config.ssl_certfile,
        ssl_keyfile=config.ssl_keyfile,
        root_path=config.root_path,
    )
    server = _Server(uv_config, app.state.tandem.stop_requested)
    sockets = None
    if config.fd is not None:
        sockets = [socket.socket(fileno=config.fd)]
    server.run(sockets=sockets)
    return 0 if server.started else 1
