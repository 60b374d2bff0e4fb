"""CurveZMQ key files: one Z85 key per file in a keys folder (made by `tandem keys generate`).

Layout: server.public, server.secret (engines), client.public, client.secret (API processes).
Reading needs only the standard library; generating keys lives in tandem.keys (it needs pyzmq).
"""

from __future__ import annotations

from pathlib import Path

KEY_FILES = ("server.public", "server.secret", "client.public", "client.secret")


def _read(folder: str, name: str) -> bytes:
    path = Path(folder) / name
    try:
        key = path.read_text().strip().encode()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"CurveZMQ key file {path} is missing (create keys with `tandem keys generate DIR`)"
        ) from exc
    if len(key) != 40:
        raise ValueError(f"{path} does not hold a 40-character Z85 CurveZMQ key")
    return key


def load_server_keys(folder: str) -> tuple[bytes, bytes]:
    """(public, secret) of the engine, plus the client public key it accepts via load_allowed_client_key."""
    return _read(folder, "server.public"), _read(folder, "server.secret")


def load_allowed_client_key(folder: str) -> bytes:
    return _read(folder, "client.public")


def load_client_keys(folder: str) -> dict[str, bytes]:
    return {
        "client_public": _read(folder, "client.public"),
        "client_secret": _read(folder, "client.secret"),
        "server_public": _read(folder, "server.public"),
    }
