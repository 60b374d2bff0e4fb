"""An engine step reads from the device once: sampled ids, logprobs, prompt logprobs and structured-output
masks included. On CPU every host read of a tensor is counted; on CUDA, torch's sync debug mode counts
the synchronizations themselves (pageable host->device copies included)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.readback import DeviceReadback
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, SamplingParams, StructuredSpec

# Tensor methods that hand a device value to the host.
HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts DeviceReadback.fetch calls and every other host read of a tensor made outside them."""
    counts = {"fetch": 0, "stray": 0}
    inside_fetch = False
    stray: list[str] = []

    def counting(name: str) -> Callable:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            if not inside_fetch:
                counts["stray"] += 1
                stray.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    original_fetch = DeviceReadback.fetch

    def fetch(self: DeviceReadback) -> None:
        nonlocal inside_fetch
        counts["fetch"] += 1
        inside_fetch = True
        try:
            original_fetch(self)
        finally:
            inside_fetch = False

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(DeviceReadback, "fetch", fetch)
    yield counts
    assert not stray, f"host reads outside the step's readback: {stray}"


def _stepper(model_dir: Path, device: str) -> EngineStepper:
    config = EngineConfig(model=str(model_dir), kv_cache_memory=8 * 2**20, device=device, enforce_eager=True)
    return EngineStepper(build_engine_parts(config))


def _add_everything(stepper: EngineStepper) -> None:
    """One request per sampler feature, all in the same steps."""
    variants = [
        {"temperature": 0.0, "logprobs": 5, "prompt_logprobs": 3},
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "seed": 7},
        {"temperature": 1.0, "logit_bias": {5: 2.0}, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
        {
            "temperature": 1.0,
            "presence_penalty": 0.7,
            "min_tokens": 4,
            "allowed_token_ids": list(range(3, 90)),
        },
        {"temperature": 1.0, "structured": StructuredSpec(regex="[a-z ]{1,40}")},
    ]
    for i, sampling in enumerate(variants):
        params = SamplingParams(max_tokens=6, ignore_eos=True, **sampling)  # type: ignore[arg-type]
        prompt = list(range(10 + i, 40 + i))
        assert stepper.add(AddRequest(f"r{i}", prompt, params, time.time()), b"test", []) is None


def _wait_for_grammars(stepper: EngineStepper) -> None:
    deadline = time.monotonic() + 60
    while stepper._structured is not None and stepper._structured.compiling and time.monotonic() < deadline:
        stepper._poll_grammars()
        time.sleep(0.01)


def test_each_step_reads_the_device_once(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    stepper = _stepper(tiny_model_dir("llama"), "cpu")
    _add_everything(stepper)
    _wait_for_grammars(stepper)  # compiles happen on worker threads; only the steps are counted
    steps = 0
    finished: set[str] = set()
    while stepper.has_work:
        with count_host_reads(monkeypatch) as counts:
            deltas = stepper.step()
        monkeypatch.undo()
        assert counts["fetch"] == 1, counts
        steps += 1
        for _client, delta in deltas:
            assert delta.error is None, delta.error
            if delta.finish_reason is not None:
                finished.add(delta.request_id)
            if delta.request_id == "r0":
                assert delta.logprobs and len(delta.logprobs[0].top_ids) == 5
    assert finished == {f"r{i}" for i in range(5)}
    assert steps >= 6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_step_synchronizes_once_on_cuda(tiny_model_dir: Callable[[str], Path]) -> None:
    stepper = _stepper(tiny_model_dir("llama"), "cuda")
    _add_everything(stepper)
    _wait_for_grammars(stepper)
    stepper.step()  # the first step warms up kernels and allocators
    while stepper.has_work:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                stepper.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
