"""CurveZMQ key files: one Z85 key per file in a keys folder (made by `tandem keys generate`).

Layout: server.public, server.secret (engines), client.public, client.secret (API processes).
Engines accept only clients whose public key is in client.public or in a `NAME.client.public` file
(so several API fleets, or an old and a new key during rotation, can be allowed at once).
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
    """(public, secret) of the engine; the client keys it accepts come from load_allowed_client_keys."""
    return _read(folder, "server.public"), _read(folder, "server.secret")


def load_allowed_client_keys(folder: str) -> list[bytes]:
    """Every client public key the engine accepts (client.public and any NAME.client.public)."""
    names = sorted(p.name for p in Path(folder).glob("*.client.public"))
    if (Path(folder) / "client.public").exists() or not names:
        names.insert(0, "client.public")
    return [_read(folder, name) for name in names]


def load_client_keys(folder: str) -> dict[str, bytes]:
    return {
        "client_public": _read(folder, "client.public"),
        "client_secret": _read(folder, "client.secret"),
        "server_public": _read(folder, "server.public"),
    }
