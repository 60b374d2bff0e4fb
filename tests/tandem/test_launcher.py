"""`tandem serve` start-up checks that need no model: a port already in use is a clear error."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.server_process import REPO


def test_serve_refuses_a_port_that_is_already_in_use() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "tandem", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "--port" in proc.stderr
    assert "Traceback" not in proc.stderr
