"""HTTPS with --ssl-certfile/--ssl-keyfile and a proxy prefix with --root-path, on a real `tandem serve`."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.engine.conftest import build_tiny_hf_model, write_tokenizer_files
from tests.server_process import REPO, ServerProcess, free_port


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA and a certificate for 127.0.0.1 it signed (trustme), as PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return files


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tls")
    build_tiny_hf_model("llama").save_pretrained(folder)
    write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def https_server(tls_files: dict[str, Path], tiny_model: Path) -> Iterator[ServerProcess]:
    port = free_port()
    args = ["serve", str(tiny_model), "--port", str(port), "--ssl-certfile", str(tls_files["cert"])]
    args += ["--ssl-keyfile", str(tls_files["key"]), "--root-path", "/llm"]
    server = ServerProcess(args, port=port)
    try:
        # The launcher announces the server only after its own health check over HTTPS succeeded.
        deadline = time.monotonic() + 240
        while f"serving on https://127.0.0.1:{server.port}" not in server.log_tail(20000):
            assert server.proc.poll() is None, server.log_tail()
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
        yield server
    finally:
        server.stop()


def test_https_serves_the_api(
    https_server: ServerProcess, tls_files: dict[str, Path], tiny_model: Path
) -> None:
    base = f"https://127.0.0.1:{https_server.port}"
    trusted = ssl.create_default_context(cafile=str(tls_files["ca"]))
    with httpx.Client(verify=trusted, timeout=60) as client:
        assert client.get(f"{base}/health").status_code == 200
        body = {"prompt": "The quick brown fox", "max_tokens": 3, "ignore_eos": True}
        response = client.post(f"{base}/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
        # With --root-path, the routes still answer at the paths a prefix-stripping proxy forwards.
        assert client.get(f"{base}/v1/models").json()["data"][0]["id"] == tiny_model.name
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
        httpx.get(f"http://127.0.0.1:{https_server.port}/health", timeout=10)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the server
        httpx.get(f"{base}/health", timeout=10)


def test_unusable_tls_files_stop_tandem_serve(tls_files: dict[str, Path], tiny_model: Path) -> None:
    cases = {
        "cannot load --ssl-certfile": ["--ssl-certfile", str(tls_files["cert"].parent / "missing.pem")],
        "--ssl-keyfile needs --ssl-certfile": ["--ssl-keyfile", str(tls_files["key"])],
        "cannot load": ["--ssl-certfile", str(tls_files["ca"]), "--ssl-keyfile", str(tls_files["ca"])],
    }
    for message, flags in cases.items():
        proc = subprocess.run(
            [sys.executable, "-m", "tandem", "serve", str(tiny_model), *flags],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr, proc.stderr
