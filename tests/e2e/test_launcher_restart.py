"""`tandem serve` supervises its children: an engine killed after start-up is restarted in place and the
API process takes it back into service without a restart of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx

from tests.conftest import DEFAULT_MODEL_NAME
from tests.server_process import serve


def _child_pids(parent: int, needle: str) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent), "-f", needle], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_killed_engine_is_restarted_and_serves_again() -> None:
    server = serve()
    try:
        # The launcher restarts children only once it has itself seen the server healthy ("serving on").
        deadline = time.monotonic() + 30
        while "tandem: serving on" not in server.log_tail(20000) and time.monotonic() < deadline:
            time.sleep(0.2)
        (engine_pid,) = _child_pids(server.proc.pid, "tandem engine")
        os.kill(engine_pid, signal.SIGKILL)
        body = {"model": DEFAULT_MODEL_NAME, "prompt": "Hello", "max_tokens": 3}
        deadline = time.monotonic() + 180
        status = None
        while time.monotonic() < deadline:
            new_pids = _child_pids(server.proc.pid, "tandem engine")
            if new_pids and new_pids != [engine_pid]:
                try:
                    status = httpx.post(
                        f"{server.base_url}/v1/completions", json=body, timeout=30
                    ).status_code
                except httpx.HTTPError:
                    status = None
                if status == 200:
                    break
            time.sleep(1)
        assert status == 200, server.log_tail()
        assert "engine-0 exited with code -9; restarted it" in server.log_tail(20000)
        assert server.proc.poll() is None  # the launcher itself kept running
    finally:
        server.stop()
