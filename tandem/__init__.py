"""Tandem: an OpenAI-compatible LLM inference server, and its offline API (`from tandem import LLM, SamplingParams`)."""

from __future__ import annotations

from typing import Any

# Imported on first use, so that `tandem serve` and `import tandem` stay light.
_PUBLIC = {
    "LLM": "tandem.offline",
    "SamplingParams": "tandem.offline_params",
    "StructuredOutputsParams": "tandem.offline_params",
    "RequestOutput": "tandem.offline_params",
    "CompletionOutput": "tandem.offline_params",
    "EmbeddingOutput": "tandem.offline_params",
    "Logprob": "tandem.offline_params",
    "ToolCall": "tandem.offline_params",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tandem' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
