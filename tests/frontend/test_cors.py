"""CORS in the API process (in-process app, no engine needed): credentials only for an explicit origin
list with --allow-credentials, never with '*', and a `null` or unlisted Origin is never reflected."""

from __future__ import annotations

from starlette.testclient import TestClient

from frontend.app import build_app
from frontend.config import FrontendConfig

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def _client(**config: object) -> TestClient:
    return TestClient(build_app(FrontendConfig(engine_addresses=("ipc:///nonexistent",), **config)))  # type: ignore[arg-type]


def _preflight(client: TestClient, origin: str) -> dict[str, str]:
    resp = client.options("/v1/chat/completions", headers={"Origin": origin, **PREFLIGHT})
    return {k.lower(): v for k, v in resp.headers.items()}


def test_wildcard_origins_never_allow_credentials() -> None:
    for client in (_client(allowed_origins=("*",)), _client(allowed_origins=("*",), allow_credentials=True)):
        for origin in ("http://evil.example", "null"):
            headers = _preflight(client, origin)
            assert headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in headers
            simple = client.get("/version", headers={"Origin": origin})
            assert simple.headers["access-control-allow-origin"] == "*"
            assert "access-control-allow-credentials" not in simple.headers


def test_credentials_only_for_listed_origins_when_asked() -> None:
    listed = "http://ui.example"
    with_credentials = _client(allowed_origins=(listed,), allow_credentials=True)
    headers = _preflight(with_credentials, listed)
    assert headers["access-control-allow-origin"] == listed
    assert headers["access-control-allow-credentials"] == "true"
    for origin in ("null", "http://evil.example"):
        assert "access-control-allow-origin" not in _preflight(with_credentials, origin)
    without = _preflight(_client(allowed_origins=(listed,)), listed)
    assert without["access-control-allow-origin"] == listed
    assert "access-control-allow-credentials" not in without
