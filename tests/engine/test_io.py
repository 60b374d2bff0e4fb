"""EngineIO on real ZeroMQ sockets: decoding, bad frames, heartbeats and CurveZMQ client authentication."""

from __future__ import annotations

import logging
import pickle
import queue
import socket
import time
from collections.abc import Iterator

import pytest
import zmq

from engine.io import EngineIO
from protocol.curve import load_allowed_client_keys, load_client_keys, load_server_keys
from protocol.framing import decode, encode
from protocol.log_limit import RateLimitedWarning
from protocol.messages import PROTOCOL_VERSION, Heartbeat, Hello, Ready
from tandem.keys import generate_keys
from tests.server_process import free_port


def _ready() -> Ready:
    return Ready("engine-t", ["m"], 64, 512, 8, 16, "{}", None, None, None, [2], False)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _dealer(ctx: zmq.Context, address: str, keys: dict[str, bytes] | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys:
        sock.curve_secretkey = keys["client_secret"]
        sock.curve_publickey = keys["client_public"]
        sock.curve_serverkey = keys["server_public"]
    sock.connect(address)
    return sock


def _next_input(io: EngineIO, timeout_s: float = 3.0) -> tuple[bytes, object, list[bytes]] | None:
    try:
        return io.inputs.get(timeout=timeout_s)
    except queue.Empty:
        return None


def _echo_until_reply(io: EngineIO, sock: zmq.Socket, timeout_s: float = 3.0) -> object | None:
    """Sends HELLO; the 'engine' (this test) answers READY; returns what the client received."""
    sock.send_multipart(encode(Hello(PROTOCOL_VERSION, "t")))
    item = _next_input(io, timeout_s)
    if item is None:
        return None
    client_id, message, _ = item
    assert isinstance(message, Hello)
    io.send(client_id, _ready())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            reply, _ = decode(sock.recv_multipart())
            if not isinstance(reply, Heartbeat):
                return reply
    return None


def test_messages_round_trip_and_bad_frames_are_counted(ctx: zmq.Context) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    io = EngineIO(address, heartbeat_interval_s=0.2)
    io.start()
    try:
        sock = _dealer(ctx, address)
        sock.send_multipart([b"?", b"not a message"])  # unknown tag
        sock.send_multipart([b"H", pickle.dumps({"protocol_version": 1})])  # a pickle is not msgpack
        sock.send_multipart([b"A"])  # too few frames
        reply = _echo_until_reply(io, sock)
        assert isinstance(reply, Ready) and reply.engine_id == "engine-t"
        assert io.num_bad_messages == 3
        # The client is known now, so heartbeats reach it (carrying the published stats).
        deadline = time.monotonic() + 3
        beat = None
        while beat is None and time.monotonic() < deadline:
            if sock.poll(100):
                message, _ = decode(sock.recv_multipart())
                beat = message if isinstance(message, Heartbeat) else None
        assert beat is not None
    finally:
        io.close()


def test_raw_garbage_on_the_tcp_port_does_not_stop_the_engine(ctx: zmq.Context) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    io = EngineIO(address)
    io.start()
    try:
        for payload in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 8):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                raw.sendall(payload)
        reply = _echo_until_reply(io, _dealer(ctx, address))
        assert isinstance(reply, Ready)
    finally:
        io.close()


def test_curve_accepts_only_the_allowed_client_key(ctx: zmq.Context, tmp_path) -> None:  # noqa: ANN001
    good, other = tmp_path / "good", tmp_path / "other"
    generate_keys(str(good))
    generate_keys(str(other))
    public, secret = load_server_keys(str(good))
    address = f"tcp://127.0.0.1:{free_port()}"
    io = EngineIO(
        address,
        curve_secret_key=secret,
        curve_public_key=public,
        curve_allowed_client_keys=load_allowed_client_keys(str(good)),
    )
    io.start()
    try:
        # Another client key pair that knows the server's public key: the handshake is refused.
        intruder = {**load_client_keys(str(other)), "server_public": public}
        bad = _dealer(ctx, address, intruder)
        bad.send_multipart(encode(Hello(PROTOCOL_VERSION, "intruder")))
        assert _next_input(io, timeout_s=1.5) is None
        assert not bad.poll(200)
        # The right key pair gets through.
        reply = _echo_until_reply(io, _dealer(ctx, address, load_client_keys(str(good))))
        assert isinstance(reply, Ready)
    finally:
        io.close()


def test_extra_client_keys_can_be_allowed(tmp_path) -> None:  # noqa: ANN001
    generate_keys(str(tmp_path))
    second = tmp_path / "second"
    generate_keys(str(second))
    (tmp_path / "fleet-b.client.public").write_text((second / "client.public").read_text())
    keys = load_allowed_client_keys(str(tmp_path))
    assert keys == [
        (tmp_path / "client.public").read_text().strip().encode(),
        (second / "client.public").read_text().strip().encode(),
    ]


def test_systemd_is_told_when_the_socket_is_bound(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(notify_path)
        listener.settimeout(3)
        monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
        io = EngineIO(f"tcp://127.0.0.1:{free_port()}")
        io.start()
        try:
            assert listener.recv(64) == b"READY=1"
        finally:
            io.close()


def test_a_flood_of_garbage_logs_one_line_not_one_per_message(
    ctx: zmq.Context, caplog: pytest.LogCaptureFixture
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    io = EngineIO(address)
    io.start()
    try:
        sock = _dealer(ctx, address)
        with caplog.at_level(logging.WARNING, logger="engine.io"):
            for _ in range(200):
                sock.send_multipart([b"?", b"garbage"])
            reply = _echo_until_reply(io, sock)  # everything before it was handled
            assert isinstance(reply, Ready)
        assert io.num_bad_messages == 200
        dropped = [r for r in caplog.records if "undecodable" in r.getMessage()]
        assert len(dropped) <= 1  # rate limited (one line per 10 s); 0 if an earlier test just logged
    finally:
        io.close()


def test_rate_limited_warning_reports_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedWarning(logging.getLogger("test.limit"), interval_s=0.3)
    with caplog.at_level(logging.WARNING, logger="test.limit"):
        logged = [limited.warn("bad message %d", i) for i in range(50)]
        time.sleep(0.35)
        logged.append(limited.warn("bad message %d", 50))
    assert logged == [True] + [False] * 49 + [True]
    assert [r.getMessage() for r in caplog.records] == [
        "bad message 0",
        "bad message 50 (49 more like it since the last report)",
    ]
