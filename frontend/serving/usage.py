"""OpenAI `usage` of one API request: whole (`usage_dict`) or as far as a stream has told it (`StreamUsage`)."""

from __future__ import annotations

from typing import Any

from frontend.serving.input_processor import ChoiceJob
from frontend.serving.output import ChoiceDelta


def usage_flags(stream_options: Any) -> tuple[bool, bool]:
    """(final usage chunk, usage on every chunk); as vLLM, per-chunk usage only with the final one."""
    include_usage = bool(stream_options and stream_options.include_usage)
    return include_usage, include_usage and bool(stream_options.continuous_usage_stats)


class StreamUsage:
    """What a stream has told the client so far: `continuous_usage_stats` counts and `return_token_ids`.

    The choices' outputs run ahead of the stream (their deltas are processed as they arrive, before
    the consumer writes them), so each chunk's usage counts only the deltas consumed up to it: the
    role chunk reports 0 completion tokens and later counts grow with every chunk. Token ids of deltas
    that produced no chunk (text held back) go out with the choice's next chunk.
    """

    def __init__(self, jobs: list[ChoiceJob]) -> None:
        self.jobs = jobs
        self.num_completion_tokens = 0
        self.pending_ids: dict[int, list[int]] = {job.index: [] for job in jobs}

    def add(self, index: int, delta: ChoiceDelta) -> None:
        self.num_completion_tokens += len(delta.token_ids)
        self.pending_ids[index].extend(delta.token_ids)

    def take_token_ids(self, index: int) -> list[int]:
        ids, self.pending_ids[index] = self.pending_ids[index], []
        return ids

    def current(self) -> dict[str, Any]:
        usage = usage_dict(self.jobs)
        usage["completion_tokens"] = self.num_completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + self.num_completion_tokens
        return usage


def usage_dict(jobs: list[ChoiceJob]) -> dict:
    """OpenAI usage: each prompt counted once, every choice's completion tokens counted."""
    first_of_prompt: dict[int, ChoiceJob] = {}
    for job in jobs:
        first_of_prompt.setdefault(job.prompt_index, job)
    prompt_tokens = sum(len(j.add.prompt_token_ids) for j in first_of_prompt.values())
    completion_tokens = sum(len(j.output.token_ids) for j in jobs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": sum(j.output.num_cached_tokens for j in first_of_prompt.values())
        },
    }
