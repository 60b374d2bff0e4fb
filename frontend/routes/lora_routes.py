"""vLLM's runtime LoRA endpoints: `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`.

They exist only while some engine runs with --enable-lora (vLLM registers them only when runtime LoRA
updating is allowed; elsewhere they are an unknown route, 404). Each sends the operation to every live
engine of the base model and answers once all of them did: 200 with vLLM's plain-text sentence, or the
engine's error. Every API process learns the new adapter list from the engines' broadcast LoraResult.
"""

from __future__ import annotations

import uuid

import msgspec
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from frontend.engine_client import EngineConnection
from frontend.errors import APIError, engine_unavailable, invalid_request
from frontend.request_body import read_body
from frontend.schemas import _decode as decode_body
from frontend.serving.model_context import ModelContext
from frontend.state import AppState
from protocol.messages import LoadLora, LoraAdapter, LoraResult, UnloadLora


class LoadLoraAdapterRequest(msgspec.Struct, forbid_unknown_fields=False):
    lora_name: str | None = None
    lora_path: str | None = None
    base_model_name: str | None = None  # Tandem: which served model it extends (default: the default model)


class UnloadLoraAdapterRequest(msgspec.Struct, forbid_unknown_fields=False):
    lora_name: str | None = None


_load_decoder = msgspec.json.Decoder(LoadLoraAdapterRequest)
_unload_decoder = msgspec.json.Decoder(UnloadLoraAdapterRequest)


def _state(request: Request) -> AppState:
    return request.app.state.tandem


def _require_lora(request: Request, state: AppState) -> None:
    """A 404 "no such route", as for any unknown path, unless some engine accepts adapters."""
    if not any(c.ready is not None and c.ready.enable_lora for c in state.client.engines):
        raise APIError(
            f"Route {request.method} {request.url.path} not found.",
            status=404,
            type="invalid_request_error",
            code="not_found",
        )


def _base_engines(state: AppState, base: ModelContext) -> list[EngineConnection]:
    engines = [c for c in state.client.engines if c.alive and c.group == base.group]
    if not engines:
        raise engine_unavailable(f"No engine of the model `{base.model_name}` is available.")
    return engines


def _first_error(results: list[LoraResult]) -> APIError | None:
    for result in results:
        if result.error is not None:
            status = result.error_status if result.error_status in (400, 404, 503) else 400
            code = {404: "not_found", 503: "engine_unavailable"}.get(status)
            kind = "server_error" if status == 503 else "invalid_request_error"
            return APIError(result.error, status=status, type=kind, code=code)
    return None


async def load_lora_adapter(request: Request) -> Response:
    state = _state(request)
    _require_lora(request, state)
    body = await read_body(request, state.config.max_request_body_bytes)
    req = decode_body(_load_decoder, body)
    if not req.lora_name or not req.lora_path:
        raise invalid_request("Both 'lora_name' and 'lora_path' must be provided.")
    if req.lora_name in state.models.by_name:
        what = "lora adapter" if req.lora_name in state.models.adapters else "model name"
        raise invalid_request(f"The {what} '{req.lora_name}' has already been loaded.", "lora_name")
    base = state.context_for(req.base_model_name)
    if base.lora_name is not None:
        raise invalid_request("`base_model_name` must name a model, not an adapter.", "base_model_name")
    if not base.ready.enable_lora:
        raise invalid_request(f"The model `{base.model_name}` runs without --enable-lora.", "base_model_name")
    engines = _base_engines(state, base)
    adapter = LoraAdapter(req.lora_name, req.lora_path)
    op = LoadLora(uuid.uuid4().hex, adapter)
    results = await state.client.lora_op(engines, op, state.config.lora_timeout_s)
    error = _first_error(results)
    if error is not None:
        # Engines that did load it drop it again, so the model's engines stay alike.
        loaded = [c for c, r in zip(engines, results, strict=True) if r.error is None]
        if loaded:
            undo = UnloadLora(uuid.uuid4().hex, req.lora_name)
            await state.client.lora_op(loaded, undo, state.config.lora_timeout_s)
        raise error
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    state = _state(request)
    _require_lora(request, state)
    body = await read_body(request, state.config.max_request_body_bytes)
    req = decode_body(_unload_decoder, body)
    if not req.lora_name:
        raise invalid_request("'lora_name' must be provided.", "lora_name")
    entry = state.models.adapters.get(req.lora_name)
    if entry is None:
        raise APIError(
            f"The lora adapter '{req.lora_name}' cannot be found.",
            status=404,
            type="invalid_request_error",
            param="lora_name",
            code="model_not_found",
        )
    engines = [c for c in _base_engines(state, entry[1]) if req.lora_name in c.adapters]
    op = UnloadLora(uuid.uuid4().hex, req.lora_name)
    error = _first_error(await state.client.lora_op(engines, op, state.config.lora_timeout_s))
    if error is not None:
        raise error
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


routes = [
    Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
]
