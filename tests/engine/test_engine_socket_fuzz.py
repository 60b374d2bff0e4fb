"""Issue 13's engine-socket guarantee, against a real `tandem engine` process over a real ZeroMQ socket:
random frames and well-formed hostile messages (absurd values in every AddRequest field, bad EmbedSpans,
unknown tags, wrong types) never end the engine, and a normal request sent alongside each of them
completes with the same greedy tokens as on an idle engine."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol.framing import Tag, decode, encode
from protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    AddRequest,
    EmbedSpan,
    FinishReason,
    Hello,
    Outputs,
    Ready,
    RequestDelta,
    SamplingParams,
    StructuredSpec,
)
from tests.server_process import ServerProcess

HIDDEN = 64  # tests/engine/conftest.py TINY_SHAPE
MAX_MODEL_LEN = 128
CANARY_PROMPT = [11, 23, 35, 47, 59, 71, 83, 95]
CANARY_TOKENS = 8
REPLY_TIMEOUT_S = 60.0


class EngineSocket:
    """A raw DEALER speaking the wire protocol to one engine, as an API process (or an attacker) would."""

    def __init__(self, address: str, engine: ServerProcess) -> None:
        self.engine = engine
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)  # a DEALER blocks sending to a dead peer; fail instead
        self.sock.connect(address)
        self.ready: Ready | None = None

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def handshake(self, timeout_s: float = 240.0) -> Ready:
        for _ in range(int(timeout_s * 2)):
            self.assert_alive()
            self.sock.send_multipart(encode(Hello(PROTOCOL_VERSION, "fuzzer")))
            while self.sock.poll(500):
                message, _ = decode(self.sock.recv_multipart())
                if isinstance(message, Ready):
                    self.ready = message
                    return message
        raise TimeoutError(f"no READY from the engine:\n{self.engine.log_tail()}")

    def assert_alive(self) -> None:
        code = self.engine.proc.poll()
        assert code is None, f"the engine exited with {code}:\n{self.engine.log_tail()}"

    def send_raw(self, frames: list[bytes]) -> None:
        self.assert_alive()
        self.sock.send_multipart(frames)

    def wait_readable(self) -> None:
        for _ in range(int(REPLY_TIMEOUT_S * 10)):
            self.assert_alive()
            if self.sock.poll(100):
                return
        raise AssertionError(f"the engine stopped answering:\n{self.engine.log_tail()}")

    def run_canary(self, others: set[str]) -> tuple[list[int], dict[str, list[RequestDelta]]]:
        """Sends a greedy request and reads until it finishes; also returns what came for `others`."""
        canary_id = f"canary-{uuid.uuid4().hex}"
        sampling = SamplingParams(max_tokens=CANARY_TOKENS, temperature=0.0, ignore_eos=True)
        self.send_raw(encode(AddRequest(canary_id, CANARY_PROMPT, sampling, 0.0)))
        tokens: list[int] = []
        seen: dict[str, list[RequestDelta]] = {}
        while True:
            self.wait_readable()
            message, _ = decode(self.sock.recv_multipart())  # whatever the engine sends must decode
            if not isinstance(message, Outputs):
                continue
            for delta in message.deltas:
                if delta.request_id == canary_id:
                    assert delta.error is None, delta.error
                    tokens += delta.new_token_ids
                    if delta.finish_reason is not None:
                        self.sock.send_multipart(encode(Abort(sorted(others))))  # stop hostile work
                        return tokens, seen
                else:
                    seen.setdefault(delta.request_id, []).append(delta)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Iterator[EngineSocket]:
    address = f"ipc:///tmp/tandem-fuzz-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    flags = ["--listen", address, "--enable-prompt-embeds", "--kv-cache-memory", "16M", "--num-threads", "1"]
    flags += ["--max-model-len", str(MAX_MODEL_LEN), "--max-waiting-requests", "64"]
    proc = ServerProcess(["engine", str(tiny_model_dir("llama")), *flags])
    client = EngineSocket(address, proc)
    try:
        client.handshake()
        yield client
    finally:
        client.close()
        code = proc.stop()
        assert code == 0, f"the engine did not shut down cleanly ({code}):\n{proc.log_tail()}"


@pytest.fixture(scope="module")
def expected_canary(engine: EngineSocket) -> list[int]:
    tokens, _ = engine.run_canary(set())
    assert len(tokens) == CANARY_TOKENS
    return tokens


# -- strategies ---------------------------------------------------------------------------------------
I64 = st.sampled_from([0, 1, -1, 511, 512, 2**31, -(2**31), 2**63 - 1, -(2**63), 2**64 - 1])
ANY_INT = st.one_of(I64, st.integers(-(2**63), 2**64 - 1))
FLOATS = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e308, -1e308, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True),
)
TOKEN_IDS = st.lists(st.one_of(st.integers(0, 511), ANY_INT), max_size=300)
SHORT_TEXT = st.text(max_size=40) | st.sampled_from(["", "\x00", "x" * 5000])
JUNK = st.recursive(
    st.none() | st.booleans() | ANY_INT | FLOATS | SHORT_TEXT | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SHORT_TEXT, inner, max_size=4),
    max_leaves=12,
)


# Per field: values the engine must run, and absurd ones it must refuse. Each example spoils a few fields
# only, so most requests get past the first check and some run all the way through the model step.
VALID_IDS = st.lists(st.integers(0, 511), max_size=4)
SAMPLING_FIELDS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "max_tokens": (st.integers(1, 6), ANY_INT),
    "temperature": (st.sampled_from([0.0, 0.7, 1.0, 50.0]), FLOATS),
    "top_p": (st.sampled_from([1.0, 0.5, 1e-9]), FLOATS),
    "top_k": (st.none() | st.integers(1, 600), ANY_INT),
    "min_p": (st.sampled_from([0.0, 0.3, 1.0]), FLOATS),
    "presence_penalty": (st.sampled_from([0.0, 2.0, -2.0]), FLOATS),
    "frequency_penalty": (st.sampled_from([0.0, 2.0, -2.0]), FLOATS),
    "repetition_penalty": (st.sampled_from([1.0, 0.5, 2.0]), FLOATS),
    "seed": (st.none() | st.integers(0, 2**63), ANY_INT),
    "min_tokens": (st.integers(0, 1), ANY_INT),
    "stop_token_ids": (VALID_IDS, TOKEN_IDS),
    "logprobs": (st.none() | st.integers(0, 20), ANY_INT),
    "prompt_logprobs": (st.none() | st.integers(0, 20), ANY_INT),
    "logit_bias": (
        st.none() | st.dictionaries(st.integers(0, 511), st.floats(-100, 100), max_size=3),
        st.dictionaries(ANY_INT, FLOATS, max_size=5),
    ),
    "allowed_token_ids": (st.none() | st.lists(st.integers(0, 511), min_size=1, max_size=4), TOKEN_IDS),
    "structured": (
        st.none() | st.sampled_from([StructuredSpec(regex="[0-9]+"), StructuredSpec(choice=["yes", "no"])]),
        st.builds(
            StructuredSpec,
            json_schema=st.none() | st.sampled_from(["{", "{}", '{"type": "integer"}', "[]"]),
            regex=st.none() | st.sampled_from(["a{99999999}", "(", "[0-9]+"]),
            choice=st.none() | st.lists(SHORT_TEXT, max_size=3),
            grammar=st.none() | SHORT_TEXT,
            any_json_object=st.booleans(),
        ),
    ),
}


@st.composite
def sampling_params(draw: st.DrawFn) -> SamplingParams:
    spoiled = draw(st.sets(st.sampled_from(sorted(SAMPLING_FIELDS)), max_size=2))
    fields = {name: draw(bad if name in spoiled else good) for name, (good, bad) in SAMPLING_FIELDS.items()}
    return SamplingParams(ignore_eos=draw(st.booleans()), **fields)


@st.composite
def embed_spans(draw: st.DrawFn, num_frames: int) -> EmbedSpan:
    good_digest = st.builds(lambda b: hashlib.blake2b(b, digest_size=16).hexdigest(), st.binary(max_size=8))
    return EmbedSpan(
        start=draw(st.integers(-2, 12) | ANY_INT),
        num_tokens=draw(st.integers(-1, 3) | ANY_INT),
        frame_index=draw(st.integers(-2, num_frames + 1) | ANY_INT),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8", "object", "<U9"])),
        digest=draw(good_digest | SHORT_TEXT),
    )


@st.composite
def hostile_add(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """(request id, frames) of a well-formed ADD with absurd values, and raw frames that may fit spans."""
    row = HIDDEN * 4
    frames = draw(
        st.lists(
            st.sampled_from([0, 1, row - 1, row, row + 1, 2 * row, HIDDEN * 2]).map(lambda n: b"\x3c" * n),
            max_size=3,
        )
    )
    spans = draw(st.lists(embed_spans(len(frames)), max_size=3))
    # Spans that are exactly right but for one field now and then, so intake is exercised past its first check.
    if frames and draw(st.booleans()):
        raw = frames[0]
        num = len(raw) // row
        spans.append(EmbedSpan(0, num, 0, "float32", hashlib.blake2b(raw, digest_size=16).hexdigest()))
    request_id = draw(st.sampled_from(["", "x" * 5000]) | st.uuids().map(lambda u: f"hostile-{u.hex}"))
    message = AddRequest(
        request_id=request_id,
        prompt_token_ids=draw(st.lists(st.integers(0, 511), min_size=1, max_size=40) | TOKEN_IDS),
        sampling=draw(sampling_params()),
        arrival_time=draw(st.just(0.0) | FLOATS),
        priority=draw(ANY_INT),
        embeds=draw(st.just([]) | st.just(spans)),
        cache_salt=draw(st.none() | SHORT_TEXT),
        embed_task=draw(st.sampled_from([False, False, False, True])),
    )
    return request_id, [*encode(message), *frames]


def _wrong_types(body: object) -> list[bytes]:
    return [Tag.ADD.value, msgspec.msgpack.encode(body)]


RAW_FRAMES = st.one_of(
    st.lists(st.binary(max_size=200), min_size=1, max_size=5),  # anything at all
    st.tuples(st.sampled_from([t.value for t in Tag]) | st.binary(max_size=3), st.binary(max_size=200)).map(
        list
    ),
    st.tuples(st.sampled_from([t.value for t in Tag]), JUNK).map(
        lambda p: [p[0], msgspec.msgpack.encode(p[1])]
    ),
    # An ADD shaped like the struct (array of 8) with any values in any position: wrong types.
    st.lists(JUNK, min_size=4, max_size=9).map(_wrong_types),
)


# -- tests --------------------------------------------------------------------------------------------
def test_embed_frames_of_the_wrong_size_fail_only_their_request(
    engine: EngineSocket, expected_canary: list[int]
) -> None:
    """Defect 2: such an ADD raised ValueError out of the engine loop; five of them stopped the server."""
    raw = b"\0" * (HIDDEN * 4 + 1)  # not a multiple of float32's 4 bytes
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    ids = {f"bad-embeds-{i}" for i in range(5)}
    for request_id in sorted(ids):
        sampling = SamplingParams(max_tokens=4)
        message = AddRequest(
            request_id, CANARY_PROMPT, sampling, 0.0, embeds=[EmbedSpan(0, 1, 0, "float32", digest)]
        )
        engine.send_raw([*encode(message), raw])
    tokens, seen = engine.run_canary(ids)
    assert tokens == expected_canary
    assert set(seen) == ids
    for deltas in seen.values():
        assert deltas[-1].finish_reason == FinishReason.ERROR and deltas[-1].error_status == 400
    engine.assert_alive()


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples in every `make test`; `make stress` can raise the count
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(hostile=st.lists(hostile_add(), min_size=1, max_size=3), raw=st.lists(RAW_FRAMES, max_size=3))
def test_hostile_messages_never_end_the_engine_nor_touch_a_normal_request(
    engine: EngineSocket,
    expected_canary: list[int],
    hostile: list[tuple[str, list[bytes]]],
    raw: list[list[bytes]],
) -> None:
    for frames in raw:
        engine.send_raw(frames)
    for _request_id, frames in hostile:
        engine.send_raw(frames)
    tokens, seen = engine.run_canary({request_id for request_id, _ in hostile})
    assert tokens == expected_canary
    for deltas in seen.values():
        # `--hypothesis-show-statistics` shows how deep the examples reach: refused or run.
        event(f"hostile ADD answered {deltas[-1].error_status or 'with tokens'}")
        for delta in deltas:
            if delta.error is not None:
                # Refusals of bad input are the peer's fault (4xx), or 503 for a full queue; never a crash.
                assert delta.error_status in (400, 503), (delta.error_status, delta.error)
                assert "Traceback" not in delta.error
    engine.assert_alive()
