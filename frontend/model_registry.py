"""The models and LoRA adapters one API process serves, learned from the engines' handshakes: one
ModelContext per model (engines that announce the same first served name serve the same model), and a
name table that turns a request's `model` into the context it runs under."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from frontend.engine_client import EngineConnection
from frontend.errors import APIError, engine_unavailable, model_not_found
from frontend.limits import InputLimits
from frontend.serving.model_context import ModelContext
from protocol.messages import LoraAdapter

logger = logging.getLogger(__name__)


@dataclass
class ModelRegistry:
    limits: InputLimits = field(default_factory=InputLimits)
    # --served-model-name of `tandem api`: renames the default model (the only one, in most setups).
    name_overrides: tuple[str, ...] = ()
    by_group: dict[str, ModelContext] = field(default_factory=dict)  # as announced, with its names
    # What requests look up: every served name and adapter name -> the context it runs under.
    by_name: dict[str, ModelContext] = field(default_factory=dict)
    models: dict[str, ModelContext] = field(default_factory=dict)  # group -> context, default first
    default: ModelContext | None = None
    adapters: dict[str, tuple[LoraAdapter, ModelContext]] = field(default_factory=dict)
    _first_index: dict[str, int] = field(default_factory=dict)  # group -> lowest engine index serving it

    def update(self, conn: EngineConnection, engines: Sequence[EngineConnection]) -> None:
        """Takes in one engine's (new) handshake or adapter list, then rebuilds the name table. This runs
        once per handshake or adapter change, never per request. A model keeps the context of its first
        handshake: engines of one model share tokenizer, template and limits."""
        if conn.ready is not None and conn.group is not None:
            if conn.group not in self.by_group:
                self.by_group[conn.group] = ModelContext.from_ready(conn.ready, limits=self.limits)
                logger.info(
                    "serving model %s (max_model_len %d) from engine %s",
                    ", ".join(conn.ready.served_model_names),
                    conn.ready.max_model_len,
                    conn.address,
                )
            index = self._first_index.get(conn.group)
            self._first_index[conn.group] = conn.index if index is None else min(index, conn.index)
        self._rebuild(engines)

    def _rebuild(self, engines: Sequence[EngineConnection]) -> None:
        # The default model is that of the first engine (in --engine order) that has answered.
        order = sorted(self.by_group, key=lambda g: self._first_index[g])
        contexts: dict[str, ModelContext] = {}
        for i, group in enumerate(order):
            ctx = self.by_group[group]
            if i == 0 and self.name_overrides:
                ctx = dataclasses.replace(ctx, served_model_names=list(self.name_overrides))
            contexts[group] = ctx
        by_name: dict[str, ModelContext] = {}
        for ctx in contexts.values():
            for name in ctx.served_model_names:
                by_name.setdefault(name, ctx)
        adapters: dict[str, tuple[LoraAdapter, ModelContext]] = {}
        for conn in engines:
            base = contexts.get(conn.group) if conn.group is not None else None
            if base is None:
                continue
            for adapter in conn.adapters.values():
                if adapter.name in by_name:
                    continue  # a model's own name, or the same adapter on another engine of the model
                view = dataclasses.replace(base, lora_name=adapter.name)
                adapters[adapter.name] = (adapter, view)
                by_name[adapter.name] = view
        self.models, self.by_name, self.adapters = contexts, by_name, adapters
        self.default = contexts[order[0]] if order else None

    def resolve(self, name: str | None) -> ModelContext:
        """The context a request for `name` runs under: 404 for a name nothing serves, 503 while no
        engine has answered yet."""
        if not name:
            if self.default is None:
                raise _starting()
            return self.default
        ctx = self.by_name.get(name)
        if ctx is None:
            if self.default is None:
                raise _starting()
            raise model_not_found(name)
        return ctx

    def health(self, engines: Sequence[EngineConnection]) -> dict[str, dict[str, object]]:
        """Per model (by its first served name): whether some engine of it is live, and how many are."""
        out: dict[str, dict[str, object]] = {}
        for group, ctx in self.models.items():
            mine = [c for c in engines if c.group == group]
            num_alive = sum(c.alive for c in mine)
            out[ctx.model_name] = {
                "healthy": num_alive > 0,
                "num_engines": len(mine),
                "num_engines_alive": num_alive,
            }
        return out

    def models_in_order(self) -> list[ModelContext]:
        """Every model's context (adapters aside), the default first."""
        return list(self.models.values())


def _starting() -> APIError:
    return engine_unavailable("The server is still starting: no engine has completed its handshake.")
