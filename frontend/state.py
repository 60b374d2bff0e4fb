"""What every route handler needs, held on the Starlette app: the engine client and the served models."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from frontend.config import FrontendConfig
from frontend.engine_client import EngineClient
from frontend.model_registry import ModelRegistry
from frontend.serving.model_context import ModelContext


@dataclass
class AppState:
    config: FrontendConfig
    client: EngineClient
    models: ModelRegistry = field(default_factory=ModelRegistry)
    num_requests_in_flight: int = 0
    accepting: bool = True
    extras: dict[str, object] = field(default_factory=dict)
    # Set by the server's signal handler: a SIGTERM before any engine answered ends the wait at once.
    stop_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def ctx(self) -> ModelContext | None:
        """The default model's context (requests that name no model); None before any handshake."""
        return self.models.default

    @property
    def model(self) -> ModelContext:
        return self.models.resolve(None)

    def context_for(self, name: str | None) -> ModelContext:
        """The context of the request's `model` (a served name or a LoRA adapter): 404 when unknown."""
        return self.models.resolve(name)
