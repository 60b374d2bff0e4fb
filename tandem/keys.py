"""`tandem keys generate DIR`: a CurveZMQ key pair for engines and one for API processes."""

from __future__ import annotations

import os
from pathlib import Path

import zmq


def generate_keys(folder: str) -> list[Path]:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for role in ("server", "client"):
        public, secret = zmq.curve_keypair()
        for suffix, key, mode in (("public", public, 0o644), ("secret", secret, 0o600)):
            path = out / f"{role}.{suffix}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as f:
                f.write(key.decode() + "\n")
            written.append(path)
    return written
