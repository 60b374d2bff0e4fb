"""Which requests speculate: only those whose next token is the plain argmax of the model's logits."""

from __future__ import annotations

from engine.request import Request

_SAMPLING_EPS = 1e-5  # the sampler's: temperatures below it are greedy


def can_speculate(request: Request) -> bool:
    """Greedy, with no logit processor, no logprobs and no prompt embeddings: then the target tokens of a
    verify step are the argmaxes of its logits, which equal what decoding one token at a time yields.
    Random sampling would need rejection sampling to keep its distribution (not implemented)."""
    s = request.sampling
    return (
        (s.temperature < _SAMPLING_EPS or s.top_k == 1)
        and s.structured is None
        and s.logprobs is None
        and s.prompt_logprobs is None
        and s.repetition_penalty == 1.0
        and not s.presence_penalty
        and not s.frequency_penalty
        and not s.logit_bias
        and not s.allowed_token_ids
        and request.num_output_tokens >= s.min_tokens
        and not request.prompt_embeds
        and request.grammar is None
    )
