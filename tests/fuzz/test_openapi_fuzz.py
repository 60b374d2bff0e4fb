"""schemathesis against the server's own /openapi.json: valid and schema-violating requests to every
described operation. No response may be a 5xx, and every rejection is an OpenAI error body."""

from __future__ import annotations

import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.fuzz.conftest import (
    FUZZ_EXAMPLES,
    bound_generation,
    check_response,
    check_rss_after_fuzz,
    warm_api_rss_mib,
)
from tests.server_process import ServerProcess

# Fields that decide how much a valid request generates: pinned low so a valid case costs a token or two.
_CHEAP = {"max_tokens": 2, "max_completion_tokens": None, "min_tokens": None, "n": 1}


def _operations(server: ServerProcess) -> list[Any]:
    api = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    return [result.ok() for result in api.get_all_operations()]


def _cheap(body: Any) -> None:
    if not isinstance(body, dict):
        return
    for name, value in _CHEAP.items():
        if name in body and isinstance(body[name], int) and not isinstance(body[name], bool):
            body[name] = value if value is not None else min(body[name], 2)
    if isinstance(body.get("sampling_params"), dict):
        _cheap(body["sampling_params"])
    bound_generation(body)


@pytest.fixture(scope="module")
def rss_before(default_server: ServerProcess) -> float:
    return warm_api_rss_mib(default_server)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_every_operation_answers_without_a_5xx(
    default_server: ServerProcess, rss_before: float, mode: GenerationMode
) -> None:
    # The strategies are driven by hypothesis here, not by schemathesis' pytest plugin (which does not
    # run under pytest 9): one run per operation, both valid and schema-violating cases.
    operations = _operations(default_server)
    assert len(operations) >= 12
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and "requestBody" not in operation.definition.raw:
            continue  # no body (a GET, or POST /ping): nothing schema-violating to send

        @settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            _cheap(case.body)
            started = time.monotonic()
            try:
                response = case.call(base_url=default_server.base_url, timeout=120)
            finally:
                # Hypothesis reports a timeout as a flaky failure without the case; name slow ones here.
                if time.monotonic() - started > 30:
                    print(
                        f"slow case ({time.monotonic() - started:.0f} s): {case.method} {case.path} {case.body!r:.500}"
                    )
            check_response(
                response.status_code, response.text, f"{case.method} {case.path} {str(case.body)[:300]}"
            )

        run()


def test_api_process_memory_returns_near_its_start(default_server: ServerProcess, rss_before: float) -> None:
    check_rss_after_fuzz(default_server, rss_before, "schemathesis run")
