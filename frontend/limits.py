"""Per-request input limits the serving layer enforces, taken from the API process's config at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from frontend.config import FrontendConfig
from frontend.errors import invalid_request


@dataclass(frozen=True)
class InputLimits:
    max_prompt_embeds_bytes: int = FrontendConfig.max_prompt_embeds_bytes
    max_batch_size: int = FrontendConfig.max_batch_size

    @classmethod
    def from_config(cls, config: FrontendConfig) -> InputLimits:
        return cls(
            max_prompt_embeds_bytes=config.max_prompt_embeds_bytes, max_batch_size=config.max_batch_size
        )

    def check_fan_out(self, num_requests: int, param: str, what: str) -> None:
        """400 when one API request would become more engine requests than `--max-batch-size`; checked
        before any prompt is tokenized, so a huge fan-out costs nothing."""
        if num_requests > self.max_batch_size:
            raise invalid_request(
                f"This request asks for {num_requests} {what}; the limit is {self.max_batch_size} "
                "(--max-batch-size). Split it into smaller requests.",
                param,
            )
