"""Prompt embeddings from requests (`--enable-prompt-embeds`): safe decoding and splicing into prompts.

Each payload is base64 of a `torch.save`d tensor. It is loaded with `weights_only=True` (no code runs,
whatever the pickle asks for), checked, cast to the model dtype, and sent to the engine as a raw frame.
torch is imported here only, lazily, so the default API path stays torch-free.

A loaded tensor can be a view far larger than its storage (`zeros(1, H).expand(10**6, H)` is a few KB on
the wire), so its shape, dtype and size are checked against the limits before anything is materialized.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from typing import Any

from frontend.errors import invalid_request
from frontend.serving.chat_template import PROMPT_EMBEDS_PLACEHOLDER
from frontend.serving.input_processor import PreparedPrompt
from frontend.serving.model_context import ModelContext
from protocol.messages import EmbedSpan

# Any valid id: the engine replaces these positions' embeddings with the request's rows.
PLACEHOLDER_TOKEN_ID = 0
# Input dtypes a client may send; others (float8, complex, integers) are refused with a 400.
ACCEPTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _require_enabled(ctx: ModelContext, param: str) -> None:
    if not ctx.ready.enable_prompt_embeds:
        raise invalid_request(
            "Prompt embeddings are disabled: start the server with `--enable-prompt-embeds` to use them.",
            param,
        )


def decode_embeds(
    ctx: ModelContext, data: str, param: str, max_bytes: int | None = None
) -> tuple[bytes, str]:
    """Raw rows (model dtype, C order) of one base64 payload, and the dtype name; 400 naming the problem."""
    import torch

    limit = max_bytes or ctx.limits.max_prompt_embeds_bytes
    # base64 is 4/3 the size of its bytes: refuse an oversized payload before decoding it.
    if len(data) * 3 // 4 > limit:
        raise invalid_request(
            f"`{param}` is larger than the {limit}-byte limit for prompt embeddings.", param
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request(f"`{param}` is not valid base64.", param) from None
    try:
        tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for bad or unsafe pickles; all are the client's
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise invalid_request(
            f"`{param}` is not a tensor saved with torch.save that can be loaded safely: {reason}", param
        ) from None
    dtype = getattr(torch, ctx.ready.model_dtype, torch.float32)
    rows = _check_tensor(tensor, ctx, param)
    _check_size(rows.shape[0], ctx, max(rows.element_size(), dtype.itemsize), limit, param)
    # Materialize only now that the size is known to fit; check finiteness after the cast, since a
    # float64 value that is finite can overflow to inf in the model dtype.
    rows = rows.to(dtype).contiguous()
    if not bool(torch.isfinite(rows).all()):
        raise invalid_request(
            f"`{param}` holds NaN or infinite values (in the model dtype {ctx.ready.model_dtype}).", param
        )
    if dtype == torch.bfloat16:
        # numpy has no bfloat16: the engine reads these frames as raw 16-bit words.
        return rows.view(torch.int16).numpy().tobytes(), "bfloat16"
    return rows.numpy().tobytes(), str(dtype).removeprefix("torch.")


def _check_tensor(tensor: Any, ctx: ModelContext, param: str) -> Any:
    """The (num_tokens, hidden_size) view of a loaded payload, checked from its metadata only."""
    import torch

    hidden_size = ctx.ready.hidden_size
    # A Parameter or a tensor that records gradients cannot be turned into bytes; refuse it plainly.
    if type(tensor) is not torch.Tensor:
        raise invalid_request(f"`{param}` must hold a plain tensor, got {type(tensor).__name__}.", param)
    if tensor.requires_grad:
        raise invalid_request(f"`{param}` must not require grad: save `tensor.detach()`.", param)
    if tensor.layout != torch.strided or tensor.is_sparse or tensor.is_quantized:
        raise invalid_request(f"`{param}` must be a dense tensor.", param)
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in ACCEPTED_DTYPES:
        raise invalid_request(
            f"`{param}` has dtype {dtype_name}; expected one of {', '.join(ACCEPTED_DTYPES)}.", param
        )
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor.squeeze(0)
    if tensor.dim() != 2:
        raise invalid_request(
            f"`{param}` must have shape (num_tokens, hidden_size), got {tuple(tensor.shape)}.", param
        )
    if tensor.shape[0] == 0:
        raise invalid_request(f"`{param}` holds no rows.", param)
    if tensor.shape[1] != hidden_size:
        raise invalid_request(
            f"`{param}` rows have size {tensor.shape[1]}; this model's hidden size is {hidden_size}.", param
        )
    return tensor


def _check_size(num_rows: int, ctx: ModelContext, item_size: int, limit: int, param: str) -> None:
    """Refuses more rows than the context holds, or more bytes than the limit once cast."""
    if num_rows > ctx.max_model_len:
        raise invalid_request(
            f"`{param}` has {num_rows} rows; this model's context holds {ctx.max_model_len} tokens.", param
        )
    num_bytes = num_rows * ctx.ready.hidden_size * item_size
    if num_bytes > limit:
        raise invalid_request(
            f"`{param}` needs {num_bytes} bytes once decoded, over the {limit}-byte limit for prompt "
            "embeddings.",
            param,
        )


def _span(raw: bytes, dtype: str, start: int, hidden_size: int, frame_index: int) -> EmbedSpan:
    item_size = 4 if dtype == "float32" else 2
    return EmbedSpan(
        start=start,
        num_tokens=len(raw) // (item_size * hidden_size),
        frame_index=frame_index,
        dtype=dtype,
        digest=hashlib.blake2b(raw, digest_size=16).hexdigest(),
    )


def prompts_from_embeds(
    ctx: ModelContext, prompt_embeds: str | list[str], max_bytes: int | None = None
) -> list[PreparedPrompt]:
    """Completions' `prompt_embeds`: one prompt per payload, made only of embedding positions."""
    _require_enabled(ctx, "prompt_embeds")
    payloads = [prompt_embeds] if isinstance(prompt_embeds, str) else list(prompt_embeds)
    prompts = []
    for index, data in enumerate(payloads):
        param = "prompt_embeds" if isinstance(prompt_embeds, str) else f"prompt_embeds[{index}]"
        raw, dtype = decode_embeds(ctx, data, param, max_bytes)
        span = _span(raw, dtype, 0, ctx.ready.hidden_size, 0)
        prompts.append(
            PreparedPrompt([PLACEHOLDER_TOKEN_ID] * span.num_tokens, "", embeds=[span], buffers=[raw])
        )
    return prompts


def prompt_with_embeds(
    ctx: ModelContext, text: str, embeds_b64: list[str], max_bytes: int | None = None
) -> PreparedPrompt:
    """A rendered chat whose text holds one placeholder per prompt_embeds part, in order."""
    _require_enabled(ctx, "messages")
    pieces = text.split(PROMPT_EMBEDS_PLACEHOLDER)
    if len(pieces) != len(embeds_b64) + 1:
        raise invalid_request(
            "The chat template dropped or repeated a prompt_embeds part; it cannot be placed.", "messages"
        )
    token_ids: list[int] = []
    spans: list[EmbedSpan] = []
    buffers: list[bytes] = []
    for index, piece in enumerate(pieces):
        if piece:
            token_ids.extend(ctx.encode(piece, add_special_tokens=False))
        if index == len(embeds_b64):
            break
        raw, dtype = decode_embeds(ctx, embeds_b64[index], f"messages.prompt_embeds[{index}]", max_bytes)
        span = _span(raw, dtype, len(token_ids), ctx.ready.hidden_size, len(buffers))
        token_ids.extend([PLACEHOLDER_TOKEN_ID] * span.num_tokens)
        spans.append(span)
        buffers.append(raw)
    return PreparedPrompt(token_ids, text, embeds=spans, buffers=buffers)
