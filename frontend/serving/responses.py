"""OpenAI response shapes: choice bodies, stream chunks and logprob formats for chat and completions."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from frontend.serving.detokenizer import token_text
from frontend.serving.output import MIN_LOGPROB, ChoiceOutput, LogprobEntry
from protocol.messages import TokenLogprob


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
    """OpenAI's legacy format. `top_logprobs` always holds the chosen token too (up to logprobs + 1
    entries, as OpenAI documents); an echoed first prompt token has null logprob and top_logprobs."""
    offsets = []
    pos = text_offset_start
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_completion_top(e) for e in entries],
        "text_offset": offsets,
    }


def _completion_top(entry: LogprobEntry) -> dict[str, float] | None:
    if entry.logprob is None:
        return None
    top = {t: v for t, v, _ in entry.top}
    top.setdefault(entry.token, entry.logprob)
    return top


def prompt_logprobs_json(
    tokenizer: Tokenizer, rows: list[TokenLogprob | None] | None, num_top: int | None = None
) -> list[Any] | None:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the prompt token and the `num_top` most likely alternatives."""
    if rows is None:
        return None
    result: list[Any] = []
    for lp in rows:
        if lp is None:
            result.append(None)
            continue
        position = {
            str(lp.token_id): _prompt_logprob(tokenizer, lp.token_id, lp.logprob, lp.rank),
        }
        for rank, (token_id, value) in enumerate(
            zip(lp.top_ids[:num_top], lp.top_logprobs, strict=False), start=1
        ):
            position.setdefault(str(token_id), _prompt_logprob(tokenizer, token_id, value, rank))
        result.append(position)
    return result


def _prompt_logprob(tokenizer: Tokenizer, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
    return {
        "logprob": max(logprob, MIN_LOGPROB),
        "rank": rank,
        "decoded_token": token_text(tokenizer, token_id),
    }


def chat_choice(index: int, output: ChoiceOutput, *, want_logprobs: bool) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": output.text, "tool_calls": []},
        "logprobs": chat_logprobs(output.logprobs) if want_logprobs else None,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
    }


def _chunk(
    object_name: str,
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    with_usage_key: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage_key or usage is not None:
        chunk["usage"] = usage
    return chunk


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    *,
    with_usage_key: bool = False,
) -> dict[str, Any]:
    return _chunk("chat.completion.chunk", response_id, created, model, choices, usage, with_usage_key)


def completion_chunk(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    *,
    with_usage_key: bool = False,
) -> dict[str, Any]:
    return _chunk("text_completion", response_id, created, model, choices, usage, with_usage_key)
