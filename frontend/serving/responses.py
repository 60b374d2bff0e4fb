"""OpenAI response shapes: choice bodies, stream chunks and logprob formats for chat and completions."""

from __future__ import annotations

from typing import Any

from frontend.serving.output import ChoiceOutput, LogprobEntry


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, v, b in e.top],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[LogprobEntry], text_offset_start: int) -> dict[str, Any]:
    offsets = []
    pos = text_offset_start
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: v for t, v, _ in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_choice(index: int, output: ChoiceOutput, *, want_logprobs: bool) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": output.text, "tool_calls": []},
        "logprobs": chat_logprobs(output.logprobs) if want_logprobs else None,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
    }


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    *,
    with_usage_key: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage_key or usage is not None:
        chunk["usage"] = usage
    return chunk


def completion_chunk(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    *,
    with_usage_key: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage_key or usage is not None:
        chunk["usage"] = usage
    return chunk
