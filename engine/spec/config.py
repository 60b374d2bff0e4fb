"""--speculative-config: vLLM's JSON spelling, checked once at start-up. No torch here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_KNOWN_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
_DEFAULT_LOOKUP = 5  # vLLM's prompt_lookup_min/max when neither is given


@dataclass(frozen=True)
class SpeculativeConfig:
    """n-gram (prompt lookup) speculation: up to num_speculative_tokens drafts per step, copied from
    after the most recent earlier match of the last prompt_lookup_max..prompt_lookup_min tokens."""

    num_speculative_tokens: int
    prompt_lookup_max: int = _DEFAULT_LOOKUP
    prompt_lookup_min: int = _DEFAULT_LOOKUP
    method: str = "ngram"


def _positive_int(spec: dict[str, Any], key: str) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"--speculative-config: {key} must be a whole number of at least 1, got {value!r}")
    return value


def parse_speculative_config(
    value: str | dict[str, Any] | SpeculativeConfig | None,
) -> SpeculativeConfig | None:
    """The flag's JSON text (or the offline API's dict) as a SpeculativeConfig; ValueError says what is
    wrong. Defaults as vLLM's: neither lookup bound given -> both 5; one given -> the other equals it."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    spec: Any = value
    if isinstance(value, str):
        try:
            spec = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--speculative-config is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--speculative-config must be a JSON object, got {spec!r}")
    unknown = sorted(set(spec) - set(_KNOWN_KEYS))
    if unknown:
        raise ValueError(
            f"--speculative-config: unsupported key(s) {', '.join(unknown)}; known: {', '.join(_KNOWN_KEYS)}"
        )
    method = spec.get("method", "ngram")
    if method != "ngram":
        raise ValueError(f"--speculative-config: method {method!r} is not supported; only 'ngram' is")
    num_tokens = _positive_int(spec, "num_speculative_tokens")
    if num_tokens is None:
        raise ValueError("--speculative-config: num_speculative_tokens is required")
    lookup_max = _positive_int(spec, "prompt_lookup_max")
    lookup_min = _positive_int(spec, "prompt_lookup_min")
    if lookup_max is None and lookup_min is None:
        lookup_max = lookup_min = _DEFAULT_LOOKUP
    lookup_max = lookup_max if lookup_max is not None else lookup_min
    lookup_min = lookup_min if lookup_min is not None else lookup_max
    assert lookup_min is not None and lookup_max is not None
    if lookup_min > lookup_max:
        raise ValueError(
            f"--speculative-config: prompt_lookup_min={lookup_min} must be <= prompt_lookup_max={lookup_max}"
        )
    return SpeculativeConfig(num_tokens, lookup_max, lookup_min)
