"""Host cost of one engine step without the model: scheduler, stepper and update_from_output for 64
decoding requests (half with logprobs), the model replaced by a runner that answers at once.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/step_host_cost.py 5   # 5 waves; prints us/step per wave

Runs on commits before issue 15 section 2 too (their runner returned a StepResult), so an A/B of two
worktrees can alternate the same script. The default model is loaded only for its tokenizer and config.
"""

from __future__ import annotations

import sys
import time

import engine
from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, SamplingParams

try:
    from engine.step_output import ModelRunnerOutput

    def make_output(sampled: dict, logprobs: dict) -> object:
        return ModelRunnerOutput(sampled, logprobs)
except ImportError:  # before issue 15 section 2
    from engine.model_runner import StepResult  # type: ignore[attr-defined]

    def make_output(sampled: dict, logprobs: dict) -> object:
        return StepResult(sampled, logprobs, {})


class InstantRunner:
    def __init__(self, sampler: object) -> None:
        self.sampler = sampler  # older steppers told the sampler about finished requests

    def execute(self, out: object, bitmask_for: object = None) -> object:
        sampled, logprobs = {}, {}
        for request, num_new in out.scheduled:  # type: ignore[attr-defined]
            if request.num_computed_tokens + num_new == request.num_tokens:
                sampled[request.request_id] = 100 + request.num_output_tokens % 50
                if request.sampling.logprobs is not None:
                    logprobs[request.request_id] = (-0.5, 1, [100], [-0.5])
        return make_output(sampled, logprobs)


def main() -> None:
    waves = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    parts = build_engine_parts(EngineConfig(dtype="float32", kv_cache_memory=256 * 2**20, max_num_seqs=64))
    parts.runner = InstantRunner(parts.runner.sampler)  # type: ignore[assignment]
    stepper = EngineStepper(parts)
    print("engine from", engine.__file__, file=sys.stderr)
    per_step_us = []
    for wave in range(waves):
        for i in range(64):
            params = SamplingParams(
                max_tokens=200, ignore_eos=True, temperature=0.0, logprobs=1 if i % 2 else None
            )
            prompt = [10 + (i + k) % 500 for k in range(32)]
            stepper.add(AddRequest(f"r{wave}-{i}", prompt, params, time.time()), b"c", [])
        steps = 0
        start = time.perf_counter()
        while stepper.has_work:
            stepper.step()
            steps += 1
        per_step_us.append((time.perf_counter() - start) / steps * 1e6)
    print("us/step per wave:", " ".join(f"{t:.0f}" for t in per_step_us))


if __name__ == "__main__":
    main()
