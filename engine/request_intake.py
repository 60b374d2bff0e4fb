"""Checks an ADD message and turns it into an engine Request (prompt embeddings decoded from raw frames)."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.request import PromptEmbeds, Request
from protocol.messages import AddRequest

if TYPE_CHECKING:
    from engine.engine_setup import EngineParts


class RequestRejected(ValueError):
    """The request cannot run on this engine; the message is sent back to the client."""


def _decode_embeds(message: AddRequest, frames: list[bytes], parts: EngineParts) -> list[PromptEmbeds]:
    embeds = []
    for span in message.embeds:
        if span.frame_index >= len(frames):
            raise RequestRejected(f"prompt embedding frame {span.frame_index} is missing")
        raw = frames[span.frame_index]
        if span.dtype not in ("float32", "float16", "bfloat16"):
            raise RequestRejected(f"unsupported prompt embedding dtype {span.dtype!r}")
        np_dtype = np.uint16 if span.dtype == "bfloat16" else np.dtype(span.dtype)
        array = np.frombuffer(raw, dtype=np_dtype)
        if array.size != span.num_tokens * parts.hidden_size:
            raise RequestRejected(
                f"prompt embedding has {array.size} values; expected {span.num_tokens} x {parts.hidden_size}"
            )
        rows = torch.from_numpy(array.copy()).view(span.num_tokens, parts.hidden_size)
        if span.dtype == "bfloat16":
            rows = rows.view(torch.bfloat16)
        if hashlib.blake2b(raw, digest_size=16).hexdigest() != span.digest:
            raise RequestRejected("prompt embedding digest does not match its data")
        end = span.start + span.num_tokens
        if span.start < 0 or end > len(message.prompt_token_ids):
            raise RequestRejected("prompt embedding span lies outside the prompt")
        embeds.append(PromptEmbeds(span.start, rows.to(parts.dtype), span.digest))
    return sorted(embeds, key=lambda e: e.start)


def make_request(message: AddRequest, client_id: bytes, frames: list[bytes], parts: EngineParts) -> Request:
    ids = message.prompt_token_ids
    if message.embed_task:
        raise RequestRejected(
            "this engine generates text; embeddings need an engine started with --task embed"
        )
    if not ids:
        raise RequestRejected("the prompt is empty")
    if min(ids) < 0 or max(ids) >= parts.vocab_size:
        raise RequestRejected(f"prompt token ids must be in [0, {parts.vocab_size})")
    sampling = message.sampling
    if sampling.max_tokens < 1:
        raise RequestRejected("max_tokens must be at least 1")
    if len(ids) + sampling.max_tokens > parts.max_model_len:
        raise RequestRejected(
            f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds max_model_len ({parts.max_model_len})"
        )
    embeds = _decode_embeds(message, frames, parts) if message.embeds else []
    return Request(
        request_id=message.request_id,
        client_id=client_id,
        prompt_token_ids=list(ids),
        sampling=sampling,
        arrival_time=message.arrival_time or time.time(),
        priority=message.priority,
        eos_token_ids=parts.eos_token_ids,
        prompt_embeds=embeds,
        cache_salt=message.cache_salt,
        embed_task=message.embed_task,
    )
