"""Fixtures for the offline API and benchmark tests: one in-process default model per session."""

from __future__ import annotations

import pytest

from tandem import LLM


@pytest.fixture(scope="session")
def offline_llm() -> LLM:
    """The default model loaded in the test process (a small KV cache: these tests run short batches)."""
    return LLM(kv_cache_memory="256M", dtype="float32")  # same dtype as the shared test server
