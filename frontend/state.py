"""What every route handler needs, held on the Starlette app: the engine client and the model context."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from frontend.config import FrontendConfig
from frontend.engine_client import EngineClient
from frontend.serving.model_context import ModelContext


@dataclass
class AppState:
    config: FrontendConfig
    client: EngineClient
    ctx: ModelContext | None = None
    num_requests_in_flight: int = 0
    accepting: bool = True
    extras: dict[str, object] = field(default_factory=dict)
    # Set by the server's signal handler: a SIGTERM before any engine answered ends the wait at once.
    stop_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def model(self) -> ModelContext:
        if self.ctx is None:
            from frontend.errors import engine_unavailable

            raise engine_unavailable("The server is still starting: no engine has completed its handshake.")
        return self.ctx
