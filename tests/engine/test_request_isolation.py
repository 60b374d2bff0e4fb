"""Issue 13 defects 2 and 3 on a real tiny model, in process: the engine checks every ADD field itself
(it does not trust the frontend), and a step that fails costs only the request that made it fail."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.stepper import EngineStepper
from protocol.messages import (
    AddRequest,
    EmbedSpan,
    FinishReason,
    RequestDelta,
    SamplingParams,
    StructuredSpec,
)

VOCAB = 512  # tests/engine/conftest.py TINY_SHAPE
HIDDEN = 64
PROMPT = [11, 23, 35, 47, 59, 71, 83]


@pytest.fixture(scope="module")
def stepper(tiny_model_dir: Callable[[str], Path]) -> EngineStepper:
    config = EngineConfig(model=str(tiny_model_dir("llama")), enable_prompt_embeds=True, max_model_len=128)
    return EngineStepper(build_engine_parts(config))


def _greedy(max_tokens: int = 6, **fields: object) -> SamplingParams:
    settings: dict[str, object] = {"temperature": 0.0, "ignore_eos": True, **fields}
    return SamplingParams(max_tokens=max_tokens, **settings)  # type: ignore[arg-type]


def _run(stepper: EngineStepper) -> dict[str, list[RequestDelta]]:
    deltas: dict[str, list[RequestDelta]] = {}
    # Bounded by time, not steps: a request waiting for its grammar (compiled on a worker thread) makes
    # empty steps, as many as the compile takes on a loaded machine.
    deadline = time.monotonic() + 120
    while stepper.has_work and time.monotonic() < deadline:
        for _client, delta in stepper.step():
            deltas.setdefault(delta.request_id, []).append(delta)
        if not stepper.last_step_had_work:
            time.sleep(0.001)  # as the engine loop does when nothing fits
    assert not stepper.has_work and not stepper.owner
    kv = stepper.scheduler.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks - 1, "blocks leaked"
    return deltas


def _tokens(deltas: list[RequestDelta]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


def _span(raw: bytes, start: int, num_tokens: int, dtype: str = "float32") -> EmbedSpan:
    return EmbedSpan(start, num_tokens, 0, dtype, hashlib.blake2b(raw, digest_size=16).hexdigest())


ROW = b"\0" * (HIDDEN * 4)
HOSTILE: dict[str, tuple[AddRequest, list[bytes]]] = {
    "logit_bias key past the vocabulary": (
        AddRequest("x", PROMPT, _greedy(logit_bias={VOCAB: 5.0}), 0.0),
        [],
    ),
    "negative logit_bias key": (AddRequest("x", PROMPT, _greedy(logit_bias={-3: 5.0}), 0.0), []),
    "NaN logit_bias value": (AddRequest("x", PROMPT, _greedy(logit_bias={3: float("nan")}), 0.0), []),
    "allowed_token_ids past the vocabulary": (
        AddRequest("x", PROMPT, _greedy(allowed_token_ids=[1, 10**9]), 0.0),
        [],
    ),
    "empty allowed_token_ids": (AddRequest("x", PROMPT, _greedy(allowed_token_ids=[]), 0.0), []),
    "stop token id past the vocabulary": (AddRequest("x", PROMPT, _greedy(stop_token_ids=[VOCAB]), 0.0), []),
    "logprobs past the vocabulary": (AddRequest("x", PROMPT, _greedy(logprobs=VOCAB + 1), 0.0), []),
    "prompt id past the vocabulary": (AddRequest("x", [1, VOCAB], _greedy(), 0.0), []),
    "infinite temperature": (AddRequest("x", PROMPT, _greedy(temperature=float("inf")), 0.0), []),
    "negative top_k": (AddRequest("x", PROMPT, _greedy(top_k=-5), 0.0), []),
    "top_p above 1": (AddRequest("x", PROMPT, _greedy(top_p=7.0), 0.0), []),
    "negative logprobs": (AddRequest("x", PROMPT, _greedy(logprobs=-1), 0.0), []),
    "huge prompt_logprobs": (AddRequest("x", PROMPT, _greedy(prompt_logprobs=10**6), 0.0), []),
    "zero repetition_penalty": (AddRequest("x", PROMPT, _greedy(repetition_penalty=0.0), 0.0), []),
    "min_tokens past max_tokens": (AddRequest("x", PROMPT, _greedy(min_tokens=99), 0.0), []),
    "max_tokens past the context": (AddRequest("x", PROMPT, _greedy(max_tokens=2**62), 0.0), []),
    "two structured constraints": (
        AddRequest("x", PROMPT, _greedy(structured=StructuredSpec(regex="a", choice=["b"])), 0.0),
        [],
    ),
    "empty request id": (AddRequest("", PROMPT, _greedy(), 0.0), []),
    "embed frame not a multiple of the element size": (
        AddRequest("x", PROMPT, _greedy(), 0.0, embeds=[_span(ROW + b"\0", 0, 1)]),
        [ROW + b"\0"],
    ),
    "embed frame of the wrong row count": (
        AddRequest("x", PROMPT, _greedy(), 0.0, embeds=[_span(ROW, 0, 2)]),
        [ROW],
    ),
    "embed span past the prompt": (
        AddRequest("x", PROMPT, _greedy(), 0.0, embeds=[_span(ROW, len(PROMPT), 1)]),
        [ROW],
    ),
    "embed span with a negative frame index": (
        AddRequest("x", PROMPT, _greedy(), 0.0, embeds=[EmbedSpan(0, 1, -1, "float32", "d")]),
        [ROW],
    ),
    "embed dtype float64": (
        AddRequest("x", PROMPT, _greedy(), 0.0, embeds=[_span(ROW + ROW, 0, 1, "float64")]),
        [ROW + ROW],
    ),
    "overlapping embed spans": (
        AddRequest("x", PROMPT, _greedy(), 0.0, embeds=[_span(ROW, 1, 1), _span(ROW, 1, 1)]),
        [ROW],
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_the_engine_rejects_what_would_break_a_step(stepper: EngineStepper, case: str) -> None:
    message, frames = HOSTILE[case]
    # A wire round trip: what a peer could really send, not a Python object the decoder would refuse.
    message = msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=AddRequest)
    rejection = stepper.add(message, b"peer", frames)
    assert rejection is not None, f"{case} was accepted"
    assert rejection.finish_reason == FinishReason.ERROR and rejection.error_status == 400
    assert rejection.error and "Traceback" not in rejection.error
    assert not stepper.has_work


def test_a_valid_prompt_embedding_still_runs(stepper: EngineStepper) -> None:
    message = AddRequest("emb", PROMPT, _greedy(3), time.time(), embeds=[_span(ROW, 2, 1)])
    assert stepper.add(message, b"peer", [ROW]) is None
    deltas = _run(stepper)["emb"]
    assert len(_tokens(deltas)) == 3 and deltas[-1].finish_reason == FinishReason.LENGTH


def test_a_failing_request_leaves_its_batch_mates_unharmed(stepper: EngineStepper) -> None:
    alone = AddRequest("alone", PROMPT, _greedy(), time.time())
    assert stepper.add(alone, b"peer", []) is None
    expected = _tokens(_run(stepper)["alone"])
    assert len(expected) == 6

    good = AddRequest("good", PROMPT, _greedy(), time.time())
    bad = AddRequest("bad", PROMPT[::-1], _greedy(), time.time())
    assert stepper.add(good, b"peer", []) is None
    assert stepper.add(bad, b"peer", []) is None
    # Fault injection: a value that slipped past intake (an engine bug, a future field) so the step
    # itself raises IndexError for this one request, as an out-of-vocabulary logit_bias key once did.
    stepper.scheduler.requests["bad"].sampling = _greedy(logit_bias={10**6: 1.0})
    deltas = _run(stepper)
    assert stepper.scheduler.requests == {}
    assert deltas["bad"][-1].finish_reason == FinishReason.ERROR and deltas["bad"][-1].error_status == 500
    assert "IndexError" not in (deltas["bad"][-1].error or "")
    assert _tokens(deltas["good"]) == expected
    assert deltas["good"][-1].finish_reason == FinishReason.LENGTH and deltas["good"][-1].error is None


def test_settings_that_contradict_the_grammar_fail_that_request_with_400(stepper: EngineStepper) -> None:
    # No digit is an allowed token, so the grammar and allowed_token_ids leave nothing to sample.
    sampling = _greedy(structured=StructuredSpec(regex="[0-9]+"), allowed_token_ids=[3])
    assert stepper.add(AddRequest("clash", PROMPT, sampling, time.time()), b"peer", []) is None
    assert stepper.add(AddRequest("fine", PROMPT, _greedy(2), time.time()), b"peer", []) is None
    deltas = _run(stepper)
    assert deltas["clash"][-1].finish_reason == FinishReason.ERROR and deltas["clash"][-1].error_status == 400
    assert "structured-output constraint" in (deltas["clash"][-1].error or "")
    assert len(_tokens(deltas["fine"])) == 2 and deltas["fine"][-1].error is None
