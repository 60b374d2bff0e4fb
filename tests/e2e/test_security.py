"""Issue 9 acceptance, security: a CurveZMQ engine on TCP that only the right client key can use, an API
process with an API key and CORS, and an engine that refuses to listen off loopback without keys."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import zmq

from protocol.curve import load_client_keys
from protocol.framing import encode
from protocol.messages import PROTOCOL_VERSION, Hello
from tandem.args import add_api_args, add_security_args, frontend_config
from tests.conftest import DEFAULT_MODEL_NAME
from tests.e2e.test_scale_out import wait_for_engines
from tests.server_process import REPO, ServerProcess, free_port

API_KEY = "s3cret-token"
ORIGIN = "http://ui.example"
ROOT_PATH = "/api"


def _tandem(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem", *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the real keys, a folder with the server's public key but another client key pair)."""
    root = tmp_path_factory.mktemp("keys")
    good, wrong = root / "good", root / "wrong"
    assert _tandem("keys", "generate", str(good)).returncode == 0
    assert _tandem("keys", "generate", str(wrong)).returncode == 0
    (wrong / "server.secret").unlink()
    shutil.copy(good / "server.public", wrong / "server.public")
    return good, wrong


@pytest.fixture(scope="module")
def secured(keys: tuple[Path, Path]) -> Iterator[tuple[str, ServerProcess, ServerProcess]]:
    good, _ = keys
    engine_port = free_port()
    address = f"tcp://127.0.0.1:{engine_port}"
    engine = ServerProcess(
        ["engine", "--listen", address, "--curve-keys", str(good), "--kv-cache-memory", "128M"],
        port=engine_port,
    )
    api_port = free_port()
    api = ServerProcess(
        [
            "api",
            "--engine",
            address,
            "--curve-keys",
            str(good),
            "--port",
            str(api_port),
            "--api-key",
            API_KEY,
            "--allowed-origins",
            ORIGIN,
            # Behind a proxy prefix: the key check must not depend on it (it once switched the check off).
            "--root-path",
            ROOT_PATH,
        ],
        port=api_port,
    )
    try:
        api.wait_healthy()
        yield address, engine, api
    finally:
        api.stop()
        engine.stop()


def _chat(base_url: str, headers: dict[str, str]) -> httpx.Response:
    body = {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_api_key_is_required_on_model_routes(secured) -> None:  # noqa: ANN001
    _, _, api = secured
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = _chat(api.base_url, headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] is not None or resp.json()["error"]["type"]
        assert httpx.get(f"{api.base_url}/v1/models", headers=headers).status_code == 401
    ok = _chat(api.base_url, {"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    # Operational routes stay open for probes and scrapers.
    assert httpx.get(f"{api.base_url}/health").status_code == 200
    assert httpx.get(f"{api.base_url}/metrics").status_code == 200


def _raw_request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, lower-cased head) for a path sent byte for byte: HTTP clients normalize `..` and `//`."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return int(head.split(" ", 2)[1]), head.lower()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", f"{ROOT_PATH}/v1/models"),
        ("GET", "//v1/models"),
        ("GET", "/v1//models"),
        ("GET", f"{ROOT_PATH}/../v1/models"),
        ("GET", "/health/../v1/models"),
        ("GET", "/v1/%6Dodels"),
        ("GET", "/%761/models"),
        ("GET", "/v1/models/"),
        ("GET", "/V1/MODELS"),
        ("HEAD", "/v1/models"),
        ("OPTIONS", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", f"{ROOT_PATH}/v1/completions"),
        ("POST", "/tokenize"),
        ("POST", f"{ROOT_PATH}/detokenize"),
        ("POST", "/inference/v1/generate"),
        ("POST", "/v1/embeddings"),
        ("POST", "/health"),  # an open path, but not an open route: wrong method
        ("GET", "/health/"),
        ("GET", "/no/such/route"),
    ],
)
def test_every_spelling_of_a_closed_route_needs_the_key(secured, method: str, path: str) -> None:  # noqa: ANN001
    _, _, api = secured
    status, head = _raw_request(api.port, method, path)
    assert status == 401, head
    assert "www-authenticate: bearer" in head
    status, _ = _raw_request(api.port, method, path, {"Authorization": "Bearer wrong"})
    assert status == 401


def test_open_routes_and_the_key_work_under_the_root_path(secured) -> None:  # noqa: ANN001
    _, _, api = secured
    open_routes = [
        ("GET", "/health"),
        ("HEAD", "/health"),
        ("GET", "/version"),
        ("GET", "/load"),
        ("GET", "/ping"),
        ("POST", "/ping"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
    ]
    for method, path in open_routes:
        assert _raw_request(api.port, method, path)[0] == 200, path
    assert _raw_request(api.port, "GET", "/metrics")[0] == 200
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert _raw_request(api.port, "GET", "/v1/models", key)[0] == 200
    assert _raw_request(api.port, "GET", "/v1/%6Dodels", key)[0] == 200
    assert _raw_request(api.port, "GET", "/no/such/route", key)[0] == 404


def test_cors_allows_only_the_configured_origin(secured) -> None:  # noqa: ANN001
    _, _, api = secured
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{api.base_url}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        f"{api.base_url}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers


def test_wrong_curve_key_cannot_submit_work(secured, keys: tuple[Path, Path]) -> None:  # noqa: ANN001
    address, _, api = secured
    _, wrong = keys
    # A raw client with an unknown key pair: its HELLO never reaches the engine, nothing comes back.
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    creds = load_client_keys(str(wrong))
    dealer.curve_secretkey, dealer.curve_publickey = creds["client_secret"], creds["client_public"]
    dealer.curve_serverkey = creds["server_public"]
    dealer.connect(address)
    dealer.send_multipart(encode(Hello(PROTOCOL_VERSION, "intruder")))
    assert dealer.poll(3000) == 0
    ctx.destroy(linger=0)
    # An API process with the wrong key gives up with a clear reason instead of serving.
    port = free_port()
    started = time.monotonic()
    bad_api = _tandem(
        "api",
        "--engine",
        address,
        "--curve-keys",
        str(wrong),
        "--port",
        str(port),
        "--engine-ready-timeout",
        "4",
    )
    assert bad_api.returncode != 0
    assert "authentication failed" in bad_api.stderr + bad_api.stdout
    assert time.monotonic() - started < 45
    # The engine is unharmed and still serves the right client.
    assert _chat(api.base_url, {"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    wait_for_engines(api.base_url, lambda e: e["alive"], timeout_s=10)


def test_engine_refuses_to_listen_off_loopback_without_keys() -> None:
    result = _tandem("engine", "--listen", f"tcp://0.0.0.0:{free_port()}")
    assert result.returncode == 2
    assert "--curve-keys" in result.stderr and "--insecure" in result.stderr


def test_api_key_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_api_args(parser)
    add_security_args(parser)
    monkeypatch.setenv("TANDEM_API_KEY", "from-env")
    config = frontend_config(parser.parse_args([]), engines=["tcp://127.0.0.1:1"])
    assert config.api_key == "from-env"
    config = frontend_config(parser.parse_args(["--api-key", "flag"]), engines=["tcp://127.0.0.1:1"])
    assert config.api_key == "flag"
