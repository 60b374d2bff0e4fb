"""SocketReader over real ZeroMQ sockets: every message delivered in order, floods split across loop turns,
arrivals announced during a send not lost, nothing delivered after close()."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from frontend.zmq_reader import _BATCH, SocketReader

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pair() -> tuple[zmq.Context, zmq.Socket, zmq.Socket]:
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.setsockopt(zmq.IDENTITY, b"client")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield ctx, router, dealer
    ctx.destroy(linger=0)


async def _until(predicate, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_flood_arrives_whole_and_in_order_over_several_loop_turns(pair) -> None:  # noqa: ANN001
    _ctx, router, dealer = pair
    got: list[bytes] = []
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    reader = SocketReader(dealer, lambda frames: got.append(frames[-1]))
    dealer.send(b"hello")  # the ROUTER learns the peer's identity
    reader.after_send()
    assert router.recv_multipart()[0] == b"client"
    n = 3 * _BATCH + 7
    for i in range(n):
        router.send_multipart([b"client", str(i).encode()])
    ticker = asyncio.ensure_future(count_turns())
    await _until(lambda: len(got) == n)
    ticker.cancel()
    assert got == [str(i).encode() for i in range(n)]
    assert turns >= 3  # the loop ran other callbacks between batches
    reader.close()


async def test_messages_keep_coming_while_the_socket_also_sends(pair) -> None:  # noqa: ANN001
    _ctx, router, dealer = pair
    got: list[bytes] = []
    reader = SocketReader(dealer, lambda frames: got.append(frames[-1]))
    for i in range(200):
        dealer.send(b"ping")
        reader.after_send()
        peer, _ = router.recv_multipart()
        router.send_multipart([peer, str(i).encode()])
        if i % 10 == 0:
            await asyncio.sleep(0)
    await _until(lambda: len(got) == 200)
    assert got == [str(i).encode() for i in range(200)]
    reader.close()


async def test_nothing_is_delivered_after_close_and_a_failing_handler_does_not_stop_reading(pair) -> None:  # noqa: ANN001
    _ctx, router, dealer = pair
    got: list[bytes] = []

    def handle(frames: list[bytes]) -> None:
        if frames[-1] == b"bad":
            raise ValueError("a handler bug")
        got.append(frames[-1])

    reader = SocketReader(dealer, handle)
    dealer.send(b"hello")
    reader.after_send()
    router.recv_multipart()
    for body in (b"1", b"bad", b"2"):
        router.send_multipart([b"client", body])
    await _until(lambda: got == [b"1", b"2"])
    reader.close()
    router.send_multipart([b"client", b"3"])
    await asyncio.sleep(0.2)
    assert got == [b"1", b"2"]
    assert dealer.recv(zmq.NOBLOCK) == b"3"  # still on the socket, not taken by the closed reader
