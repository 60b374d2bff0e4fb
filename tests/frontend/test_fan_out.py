"""Fan-out admission in `run_choices`, against scripted fake engines over real ZeroMQ sockets: a large
request has at most a window of engine requests in flight, the next is admitted as one finishes, and a
client that goes away aborts every admitted request and admits no more."""

from __future__ import annotations

import asyncio

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from frontend.sampling_params import SamplingRequest
from frontend.serving.generation import run_choices
from frontend.serving.input_processor import PreparedPrompt, plan_choices
from frontend.serving.output import output_factory
from protocol.messages import FinishReason, RequestDelta, SamplingParams
from tests.frontend.test_engine_client import _until, two_engines  # noqa: F401 - the fixture

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _jobs(count: int) -> list:
    tokenizer = Tokenizer(WordLevel({"a": 0, "b": 1, "c": 2, "d": 3}, unk_token="a"))
    prompts = [PreparedPrompt([1, 2, 3], "x") for _ in range(count)]
    params = [SamplingParams(max_tokens=4) for _ in range(count)]
    return plan_choices("fan", prompts, params, 1, output_factory(tokenizer, SamplingRequest()))


async def test_only_a_window_of_requests_is_in_the_engines(two_engines) -> None:  # noqa: ANN001, F811
    client, a, b = two_engines
    jobs = _jobs(10)
    events = run_choices(client, jobs, admit_window=3)
    consumer = asyncio.create_task(anext(events))
    await _until(lambda: len(a.adds) + len(b.adds) == 3)
    await asyncio.sleep(0.3)
    assert len(a.adds) + len(b.adds) == 3  # the other 7 wait in the API process
    engine, (peer, first) = (a, a.adds[0]) if a.adds else (b, b.adds[0])
    engine.deltas(peer, RequestDelta(first.request_id, [3], finish_reason=FinishReason.STOP))
    await consumer
    await _until(lambda: len(a.adds) + len(b.adds) == 4)  # one finished, the next is admitted
    in_flight = {add.request_id for _, add in a.adds + b.adds} - {first.request_id}
    await events.aclose()  # the client went away
    await _until(lambda: set(a.aborted + b.aborted) >= in_flight)
    await asyncio.sleep(0.3)
    assert len(a.adds) + len(b.adds) == 4  # nothing admitted after the client left
