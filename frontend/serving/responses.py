"""OpenAI response shapes: choice bodies, stream chunks and logprob formats for chat and completions."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from frontend.serving.detokenizer import token_text
from frontend.serving.output import MIN_LOGPROB, ChoiceOutput, LogprobEntry
from protocol.messages import TokenLogprob


def token_name(entry_text: str, token_id: int, as_ids: bool) -> str:
    """A token as logprobs show it: its text, or vLLM's `token_id:N` (`return_tokens_as_token_ids`), which
    stays unambiguous for byte-fallback pieces that decode to U+FFFD."""
    return f"token_id:{token_id}" if as_ids else entry_text


def _top_names(entry: LogprobEntry, as_ids: bool) -> list[str]:
    if not as_ids:
        return [t for t, _, _ in entry.top]
    return [f"token_id:{i}" for i in entry.top_ids]


def chat_logprobs(entries: list[LogprobEntry], *, as_ids: bool = False) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": token_name(e.token, e.token_id, as_ids),
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [
                    {"token": name, "logprob": v, "bytes": b}
                    for name, (_, v, b) in zip(_top_names(e, as_ids), e.top, strict=False)
                ],
            }
            for e in entries
        ]
    }


def generate_logprobs(entries: list[LogprobEntry], num_top: int) -> dict[str, Any]:
    """/inference/v1/generate's logprobs, as vLLM's tokens-out endpoint writes them: tokens always as
    `token_id:N` (the caller owns detokenization), no bytes, and `top_logprobs` holding the sampled token
    first and then the most likely others, max(num_top, 1) entries: `logprobs: 0` still shows the sampled
    token's own logprob."""
    content = []
    for e in entries:
        ranked = {e.token_id: e.logprob}
        for token_id, (_, value, _) in zip(e.top_ids, e.top, strict=False):
            ranked.setdefault(token_id, value)
        top = list(ranked.items())[: max(num_top, 1)]
        content.append(
            {
                "token": f"token_id:{e.token_id}",
                "logprob": e.logprob,
                "bytes": None,
                "top_logprobs": [{"token": f"token_id:{i}", "logprob": v, "bytes": None} for i, v in top],
            }
        )
    return {"content": content}


def completion_logprobs(
    entries: list[LogprobEntry], text_offset_start: int, *, as_ids: bool = False
) -> dict[str, Any]:
    """OpenAI's legacy format. `top_logprobs` holds the chosen token first and then the `logprobs` most
    likely ones (up to logprobs + 1 entries, as OpenAI documents and vLLM orders them); an echoed first
    prompt token has null logprob and top_logprobs. Offsets count the tokens' text."""
    offsets = []
    pos = text_offset_start
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "tokens": [token_name(e.token, e.token_id, as_ids) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_completion_top(e, as_ids) for e in entries],
        "text_offset": offsets,
    }


def _completion_top(entry: LogprobEntry, as_ids: bool) -> dict[str, float] | None:
    if entry.logprob is None:
        return None
    top = {token_name(entry.token, entry.token_id, as_ids): entry.logprob}
    for name, (_, value, _) in zip(_top_names(entry, as_ids), entry.top, strict=False):
        top.setdefault(name, value)
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


def chat_message(content: str | None) -> dict[str, Any]:
    """An assistant message with OpenAI's and vLLM's optional fields present as null, so clients that read
    them (through the openai SDK or by key) find them."""
    return {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        "reasoning": None,  # vLLM's current name; reasoning_content its older one
        "reasoning_content": None,
    }


def chat_choice(
    index: int,
    output: ChoiceOutput,
    *,
    want_logprobs: bool,
    as_ids: bool = False,
    return_token_ids: bool = False,
    echo: str = "",
) -> dict[str, Any]:
    """One finished chat choice; `echo` is the continued assistant prefix that `echo: true` repeats."""
    return {
        "index": index,
        "message": chat_message(echo + output.text),
        "logprobs": chat_logprobs(output.logprobs, as_ids=as_ids) if want_logprobs else None,
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
        "token_ids": list(output.token_ids) if return_token_ids else None,
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
