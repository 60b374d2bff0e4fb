"""Per-request input limits the serving layer enforces, taken from the API process's config at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from frontend.config import FrontendConfig


@dataclass(frozen=True)
class InputLimits:
    max_prompt_embeds_bytes: int = FrontendConfig.max_prompt_embeds_bytes

    @classmethod
    def from_config(cls, config: FrontendConfig) -> InputLimits:
        return cls(max_prompt_embeds_bytes=config.max_prompt_embeds_bytes)
