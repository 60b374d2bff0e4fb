"""The input processor: prompts and transport-neutral sampling settings in, validated engine requests out.

The HTTP handlers and the offline `LLM` both go through it, so a request is checked once, the same way:
the model-free checks (`check_sampling_request`) ran when the settings were made, this adds what needs
the model (context length, vocabulary, --max-logprobs, the grammar dry run) and builds the `AddRequest`s.
The engine re-checks only what it must because it does not trust its peers (engine/request_intake.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from frontend.errors import invalid_request
from frontend.sampling_params import SamplingRequest, build_sampling_params
from frontend.serving.output import ChoiceOutput
from frontend.structured_check import GrammarDryRun
from protocol.messages import AddRequest, EmbedSpan, Ready, StructuredSpec, WireSamplingParams


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    text: str | None = None  # the prompt as text, for echo
    embeds: list[EmbedSpan] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=list)


@dataclass
class ChoiceJob:
    index: int  # choices[index] in the response
    prompt_index: int
    add: AddRequest
    buffers: list[bytes]
    output: ChoiceOutput


def plan_choices(
    request_id: str,
    prompts: list[PreparedPrompt],
    sampling: list[WireSamplingParams],
    n: int,
    make_output: Callable[[list[int]], ChoiceOutput],
    *,
    priority: int = 0,
    cache_salt: str | None = None,
    lora_name: str | None = None,
) -> list[ChoiceJob]:
    """One engine request per (prompt, sample), indexed prompt-major as OpenAI does."""
    jobs = []
    now = time.time()
    for p, prompt in enumerate(prompts):
        for i in range(n):
            params = sampling[p]
            if n > 1 and params.seed is not None:
                params = _with_seed(params, params.seed + i)  # distinct but reproducible samples
            index = p * n + i
            add = AddRequest(
                request_id=f"{request_id}-{index}",
                prompt_token_ids=prompt.token_ids,
                sampling=params,
                arrival_time=now,
                priority=priority,
                embeds=prompt.embeds,
                cache_salt=cache_salt,
                lora_name=lora_name,
            )
            jobs.append(ChoiceJob(index, p, add, prompt.buffers, make_output(prompt.token_ids)))
    return jobs


def truncate_prompt(
    prompt: PreparedPrompt,
    keep: int | None,
    max_model_len: int,
    detokenize: Any,
    side: str | None = None,
) -> PreparedPrompt:
    """vLLM's `truncate_prompt_tokens`: keep the last `keep` prompt tokens (-1: the model's context), or
    the first ones with `truncation_side: "right"`."""
    if keep is None:
        return prompt
    if keep == -1:
        keep = max_model_len
    if len(prompt.token_ids) <= keep:
        return prompt
    if prompt.embeds:
        raise invalid_request(
            "`truncate_prompt_tokens` cannot cut a prompt that carries prompt embeddings.",
            "truncate_prompt_tokens",
        )
    kept = prompt.token_ids[:keep] if side == "right" else prompt.token_ids[-keep:]
    return PreparedPrompt(kept, detokenize(kept))


def _with_seed(params: WireSamplingParams, seed: int) -> WireSamplingParams:
    return msgspec.structs.replace(params, seed=seed)


class InputProcessor:
    """Turns requests into engine requests for one model (or one LoRA adapter of it)."""

    def __init__(
        self, ready: Ready, grammar_dry_run: GrammarDryRun | None = None, lora_name: str | None = None
    ) -> None:
        self.ready = ready
        self.grammar_dry_run = grammar_dry_run  # None: structured specs are only compiled, not tried
        self.lora_name = lora_name

    def sampling(
        self,
        settings: SamplingRequest,
        num_prompt_tokens: int,
        *,
        default_max_tokens: int | None = None,
        structured_override: StructuredSpec | None = None,
    ) -> WireSamplingParams:
        """The wire sampling settings for a prompt of this length on this model (400s on bad values);
        fields the request leaves unset take the model's generation-config defaults."""
        ready = self.ready
        return build_sampling_params(
            settings,
            num_prompt_tokens=num_prompt_tokens,
            max_model_len=ready.max_model_len,
            vocab_size=ready.vocab_size,
            eos_token_ids=ready.eos_token_ids,
            default_max_tokens=default_max_tokens,
            structured_override=structured_override,
            model_defaults=ready.default_sampling,
            max_logprobs=ready.max_logprobs,
            grammar_dry_run=self.grammar_dry_run,
        )

    def jobs(
        self,
        request_id: str,
        prompts: list[PreparedPrompt],
        sampling: list[WireSamplingParams],
        n: int,
        make_output: Callable[[list[int]], ChoiceOutput],
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> list[ChoiceJob]:
        """One engine request per (prompt, sample), each with its output processor."""
        return plan_choices(
            request_id,
            prompts,
            sampling,
            n,
            make_output,
            priority=priority,
            cache_salt=cache_salt,
            lora_name=self.lora_name,
        )
