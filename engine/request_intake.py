"""Checks an ADD message and turns it into an engine Request (prompt embeddings decoded from raw frames).

The engine does not trust its peers: the frontend validates too, but anything that reaches the socket is
checked here against what would break a step (ids outside the vocabulary, lengths, non-finite or
out-of-range numbers, malformed embedding frames), so a bad message fails its own request and no other.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.request import PromptEmbeds, Request
from protocol.messages import AddRequest, SamplingParams

if TYPE_CHECKING:
    from engine.engine_setup import EngineParts
    from engine.lora.adapter import LoraWeights


class RequestRejected(ValueError):
    """The request cannot run on this engine; the message is sent back to the client with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


MAX_REQUEST_ID_CHARS = 1024
MAX_CACHE_SALT_CHARS = 1024
_EMBED_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _check_ids(token_ids: list[int], vocab_size: int, what: str) -> None:
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        raise RequestRejected(f"{what} must be token ids in [0, {vocab_size})")
    if len(token_ids) > vocab_size:
        raise RequestRejected(f"{what} lists more ids than the vocabulary has")


def _check_number(value: float, what: str, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise RequestRejected(f"{what} must be a finite number in [{low}, {high}]")


def check_sampling(sampling: SamplingParams, vocab_size: int) -> None:
    """Every field the sampler or the stop checks index with, or divide by, within the range they handle."""
    _check_number(sampling.temperature, "temperature", 0.0, 1e6)
    _check_number(sampling.top_p, "top_p", 0.0, 1.0)
    _check_number(sampling.min_p, "min_p", 0.0, 1.0)
    _check_number(sampling.presence_penalty, "presence_penalty", -1e6, 1e6)
    _check_number(sampling.frequency_penalty, "frequency_penalty", -1e6, 1e6)
    _check_number(sampling.repetition_penalty, "repetition_penalty", 1e-6, 1e6)
    if sampling.top_k is not None and sampling.top_k < 1:
        raise RequestRejected("top_k must be at least 1 (or unset)")
    if not 0 <= sampling.min_tokens <= sampling.max_tokens:
        raise RequestRejected("min_tokens must be in [0, max_tokens]")
    for name, k in (("logprobs", sampling.logprobs), ("prompt_logprobs", sampling.prompt_logprobs)):
        # The API process applies --max-logprobs; the sampler can return up to the whole vocabulary.
        if k is not None and not 0 <= k <= vocab_size:
            raise RequestRejected(f"{name} must be in [0, {vocab_size}]")
    _check_ids(sampling.stop_token_ids, vocab_size, "stop_token_ids")
    if sampling.logit_bias:
        _check_ids(list(sampling.logit_bias), vocab_size, "logit_bias keys")
        for bias in sampling.logit_bias.values():
            _check_number(bias, "logit_bias values", -1e6, 1e6)
    if sampling.allowed_token_ids is not None:
        if not sampling.allowed_token_ids:
            raise RequestRejected("allowed_token_ids must not be empty")  # nothing could be sampled
        _check_ids(sampling.allowed_token_ids, vocab_size, "allowed_token_ids")
    spec = sampling.structured
    if spec is not None:
        num_set = sum(v is not None for v in (spec.json_schema, spec.regex, spec.choice, spec.grammar))
        if num_set + spec.any_json_object != 1:
            raise RequestRejected("a structured-output spec must set exactly one constraint")


def _decode_embeds(message: AddRequest, frames: list[bytes], parts: EngineParts) -> list[PromptEmbeds]:
    embeds = []
    for span in message.embeds:
        if span.frame_index >= len(frames):
            raise RequestRejected(f"prompt embedding frame {span.frame_index} is missing")
        if span.frame_index < 0:
            raise RequestRejected("prompt embedding frame index is negative")
        if (
            span.num_tokens < 1
            or span.start < 0
            or span.start + span.num_tokens > len(message.prompt_token_ids)
        ):
            raise RequestRejected("prompt embedding span lies outside the prompt")
        raw = frames[span.frame_index]
        itemsize = _EMBED_DTYPES.get(span.dtype)
        if itemsize is None:
            raise RequestRejected(f"unsupported prompt embedding dtype {span.dtype[:32]!r}")
        if len(raw) != span.num_tokens * parts.hidden_size * itemsize:
            raise RequestRejected(
                f"prompt embedding frame has {len(raw)} bytes; expected {span.num_tokens} x "
                f"{parts.hidden_size} {span.dtype} values"
            )
        if hashlib.blake2b(raw, digest_size=16).hexdigest() != span.digest:
            raise RequestRejected("prompt embedding digest does not match its data")
        np_dtype = np.uint16 if span.dtype == "bfloat16" else np.dtype(span.dtype)
        array = np.frombuffer(raw, dtype=np_dtype)  # the size check above makes this exact
        rows = torch.from_numpy(array.copy()).view(span.num_tokens, parts.hidden_size)
        if span.dtype == "bfloat16":
            rows = rows.view(torch.bfloat16)
        embeds.append(PromptEmbeds(span.start, rows.to(parts.dtype), span.digest))
    embeds.sort(key=lambda e: e.start)
    for before, after in zip(embeds, embeds[1:], strict=False):
        if before.start + before.num_tokens > after.start:
            raise RequestRejected("prompt embedding spans overlap")
    return embeds


def make_request(message: AddRequest, client_id: bytes, frames: list[bytes], parts: EngineParts) -> Request:
    ids = message.prompt_token_ids
    if not message.request_id or len(message.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestRejected(f"the request id must have 1 to {MAX_REQUEST_ID_CHARS} characters")
    if message.cache_salt is not None and len(message.cache_salt) > MAX_CACHE_SALT_CHARS:
        raise RequestRejected(f"cache_salt is longer than {MAX_CACHE_SALT_CHARS} characters")
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
    check_sampling(sampling, parts.vocab_size)
    # The arrival time orders the priority queue: a NaN there would corrupt it for everyone.
    arrival_time = message.arrival_time if math.isfinite(message.arrival_time) else 0.0
    if message.embeds and not parts.ready.enable_prompt_embeds:
        raise RequestRejected("prompt embeddings are not enabled on this engine (--enable-prompt-embeds)")
    embeds = _decode_embeds(message, frames, parts) if message.embeds else []
    lora = _resolve_lora(message.lora_name, parts) if message.lora_name is not None else None
    return Request(
        request_id=message.request_id,
        client_id=client_id,
        prompt_token_ids=list(ids),
        sampling=sampling,
        arrival_time=arrival_time or time.time(),
        priority=message.priority,
        eos_token_ids=parts.eos_token_ids,
        prompt_embeds=embeds,
        cache_salt=message.cache_salt,
        embed_task=message.embed_task,
        lora=lora,
    )


def _resolve_lora(name: str, parts: EngineParts) -> LoraWeights:
    """The adapter's weights; 404 naming the model when this engine does not hold it (the frontend
    checks first, but an engine does not trust its peers)."""
    from engine.lora.adapter import LoraError
    from engine.lora.manager import model_not_found

    if parts.lora is None:
        raise RequestRejected(str(model_not_found(name[:256])), 404)
    try:
        return parts.lora.resolve(name)
    except LoraError as exc:
        raise RequestRejected(str(exc), exc.status) from None
