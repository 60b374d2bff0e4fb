"""POST /v1/embeddings: inputs (text or token ids) -> pooled, normalized vectors from an `--task embed` engine."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
import uuid
from typing import Any

import msgspec
from starlette.responses import Response

from frontend.engine_client import EngineClient
from frontend.errors import APIError, invalid_request
from frontend.offload import run_off_loop
from frontend.schemas.requests import OpenAIBody
from frontend.serving.model_context import ModelContext
from frontend.serving.model_task import require_task
from frontend.serving.streaming import json_response
from protocol.messages import AddRequest, RequestDelta, WireSamplingParams

MAX_INPUTS = 2048  # OpenAI's cap on inputs per request
ENCODING_FORMATS = ("float", "base64")


class EmbeddingRequest(OpenAIBody):
    # str | list[str] | list[int] | list[list[int]]: list kinds are told apart by hand, as for prompts.
    input: str | list[Any]
    model: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = None
    priority: int | None = None


def _is_token_id(value: Any) -> bool:
    return type(value) is int and value >= 0


def _input_items(req: EmbeddingRequest) -> list[str | list[int]]:
    raw = req.input
    shape = invalid_request(
        "`input` must be a string, a list of strings, a list of token ids or a list of lists of token ids.",
        "input",
    )
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif raw and all(_is_token_id(x) for x in raw):
        items = [raw]
    elif all(isinstance(x, str) for x in raw) or all(isinstance(x, list) for x in raw):
        items = list(raw)
    else:
        raise shape
    if not items:
        raise invalid_request("`input` must not be empty.", "input")
    if len(items) > MAX_INPUTS:
        raise invalid_request(f"`input` may hold at most {MAX_INPUTS} items, got {len(items)}.", "input")
    for index, item in enumerate(items):
        if isinstance(item, list) and not all(_is_token_id(x) for x in item):
            raise shape
        if len(item) == 0:
            raise invalid_request(f"`input[{index}]` must not be empty.", f"input[{index}]")
    return items


def _tokenize(ctx: ModelContext, req: EmbeddingRequest, items: list[str | list[int]]) -> list[list[int]]:
    add_special = req.add_special_tokens is not False
    vocab_size = ctx.ready.vocab_size
    limit = ctx.max_model_len
    keep = req.truncate_prompt_tokens
    if keep is not None and keep != -1 and keep < 1:
        raise invalid_request("`truncate_prompt_tokens` must be -1 or at least 1.", "truncate_prompt_tokens")
    if keep == -1:
        keep = limit
    prompts = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            token_ids = ctx.tokenize_text(item, add_special_tokens=add_special)
        else:
            token_ids = list(item)
            bad = next((t for t in token_ids if t >= vocab_size), None)
            if bad is not None:
                raise invalid_request(
                    f"`input[{index}]` holds token id {bad}, outside the vocabulary (size {vocab_size}).",
                    "input",
                )
        if keep is not None:
            token_ids = token_ids[-keep:]
        if len(token_ids) > limit:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens. However, input {index} has "
                f"{len(token_ids)} tokens. Please reduce the length of the input.",
                "input",
            )
        prompts.append(token_ids)
    return prompts


def _check_dimensions(ctx: ModelContext, dimensions: int | None) -> None:
    if dimensions is None:
        return
    full = ctx.ready.embedding_dimensions or ctx.ready.hidden_size
    if dimensions == full:
        return
    allowed = ctx.ready.matryoshka_dimensions
    if allowed is None:
        raise invalid_request(
            f"This model does not support `dimensions` (it was not trained for Matryoshka truncation); "
            f"its embeddings have {full} dimensions.",
            "dimensions",
        )
    if dimensions < 1 or dimensions > full or (allowed and dimensions not in allowed):
        choices = ", ".join(map(str, allowed)) if allowed else f"1 to {full}"
        raise invalid_request(f"`dimensions` must be one of {choices}; got {dimensions}.", "dimensions")


def _truncate(vector: list[float], dimensions: int | None) -> list[float]:
    """Matryoshka truncation: keep the leading dimensions and renormalize."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # OpenAI's base64 format: the float32 little-endian bytes of the vector.
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


async def _embed_one(client: EngineClient, add: AddRequest, ctx: ModelContext) -> RequestDelta:
    stream = client.generate(add, group=ctx.group, model_name=ctx.model_name)
    try:
        async for delta in stream:
            if delta.finish_reason is not None:
                return delta
    finally:
        await stream.aclose()
    raise APIError("the engine ended the request without an embedding", status=500, type="server_error")


async def create_embeddings(
    ctx: ModelContext, client: EngineClient, req: EmbeddingRequest, request_id: str
) -> Response:
    require_task(ctx, "embed", "/v1/embeddings")
    model = ctx.check_model(req.model)
    encoding_format = req.encoding_format or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise invalid_request(
            f"`encoding_format` must be 'float' or 'base64', got {encoding_format!r}.", "encoding_format"
        )
    _check_dimensions(ctx, req.dimensions)
    prompts = await run_off_loop(_tokenize, ctx, req, _input_items(req))  # long inputs: off the loop
    response_id = f"embd-{uuid.uuid4().hex}"
    now = time.time()
    adds = [
        AddRequest(
            request_id=f"{response_id}-{index}",
            prompt_token_ids=token_ids,
            sampling=WireSamplingParams(max_tokens=1),
            arrival_time=now,
            priority=req.priority or 0,
            embed_task=True,
            lora_name=ctx.lora_name,
        )
        for index, token_ids in enumerate(prompts)
    ]
    # All inputs go out at once so the engine batches them into as few steps as its budget allows.
    deltas = await asyncio.gather(*(_embed_one(client, add, ctx) for add in adds))
    data = []
    for index, delta in enumerate(deltas):
        if delta.error or delta.embedding is None:
            status = delta.error_status or 500
            raise APIError(
                delta.error or "the engine returned no embedding",
                status=status,
                type="server_error" if status >= 500 else "invalid_request_error",
            )
        vector = _truncate(delta.embedding, req.dimensions)
        data.append({"index": index, "object": "embedding", "embedding": _encode(vector, encoding_format)})
    num_tokens = sum(len(p) for p in prompts)
    body = {
        "id": response_id,
        "object": "list",
        "created": int(now),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens, "completion_tokens": 0},
    }
    return json_response(body)


embedding_decoder = msgspec.json.Decoder(EmbeddingRequest)
