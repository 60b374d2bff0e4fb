"""Starts real Tandem servers for tests: `python -m tandem serve ...` on a free port, as users start them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `tandem <command>` child process with its log captured to a file."""

    def __init__(
        self,
        args: list[str],
        *,
        port: int | None = None,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.args = args
        self.log_path = (log_dir or Path("/tmp")) / f"tandem-test-{self.port}-{os.getpid()}.log"
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=REPO,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, num_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except FileNotFoundError:
            return ""

    def wait_healthy(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def serve(extra_args: list[str] | None = None, **kwargs: object) -> ServerProcess:
    port = free_port()
    server = ServerProcess(
        ["serve", "--port", str(port), "--disable-log-requests", *(extra_args or [])], port=port, **kwargs
    )  # type: ignore[arg-type]
    try:
        server.wait_healthy()
    except BaseException:
        server.stop()
        raise
    return server
