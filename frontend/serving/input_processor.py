"""The input processor: prompts and transport-neutral sampling settings in, validated engine requests out.

The HTTP handlers and the offline `LLM` both go through it, so a request is checked once, the same way:
the model-free checks (`check_sampling_request`) ran when the settings were made, this adds what needs
the model (context length, vocabulary, --max-logprobs, the grammar dry run) and builds the `AddRequest`s.
The engine re-checks only what it must because it does not trust its peers (engine/request_intake.py).
"""

from __future__ import annotations

from collections.abc import Callable

from frontend.sampling_params import SamplingRequest, build_sampling_params
from frontend.serving.generation import ChoiceJob, PreparedPrompt, plan_choices
from frontend.serving.output import ChoiceOutput
from frontend.structured_check import GrammarDryRun
from protocol.messages import Ready, StructuredSpec, WireSamplingParams


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
        make_output: Callable[[PreparedPrompt, int], ChoiceOutput],
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
