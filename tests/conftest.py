"""Project-wide fixtures: one real default-model server per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server_process import ServerProcess, serve

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def default_server() -> Iterator[ServerProcess]:
    """`tandem serve` with the default model; shared by every end-to-end test that needs no special flags."""
    server = serve(["--max-waiting-requests", "512"])
    yield server
    server.stop()
