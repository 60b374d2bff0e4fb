"""Per-step cost of structured-output masks for a batch of constrained requests, next to an unconstrained
step measured in the same run (2-core machines are noisy: compare the ratio, not absolute numbers).

    .venv/bin/python benchmarks/structured_mask.py [--batch 32] [--steps 24] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, SamplingParams, StructuredSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "person": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}},
    },
    "required": ["person", "role", "tags"],
}
PROMPT = [1, 9690, 314, 253, 1686, 347, 12891, 30]  # any short prompt; the content does not matter here


class Timer:
    """Wraps a method and records how long each call takes."""

    def __init__(self, owner: Any, name: str) -> None:
        self.samples: list[float] = []
        inner: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.samples.append(time.perf_counter() - start)

        setattr(owner, name, timed)


def run(
    stepper: EngineStepper,
    batch: int,
    steps: int,
    spec: StructuredSpec | None,
    tag: str,
    timers: tuple[Timer, ...] = (),
) -> list[tuple[float, ...]]:
    """Per full-batch decode step: (step seconds, then seconds inside each timer during that step)."""
    sampling = SamplingParams(max_tokens=steps + 2, temperature=1.0, ignore_eos=spec is None, structured=spec)
    for i in range(batch):
        stepper.add(AddRequest(f"{tag}-{i}", PROMPT, sampling, time.time()), b"bench", [])
    rows = []
    while stepper.has_work:
        marks = [len(t.samples) for t in timers]
        start = time.perf_counter()
        stepper.step()
        elapsed = time.perf_counter() - start
        if stepper.last_step_num_seqs == batch and stepper.last_step_num_tokens == batch:
            inside = [sum(t.samples[m:]) for t, m in zip(timers, marks, strict=True)]
            rows.append((elapsed, *inside))  # a pure decode step with the whole batch
        elif not stepper.last_step_had_work:
            time.sleep(0.001)  # grammars still compiling
    return rows[:steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()

    parts = build_engine_parts(EngineConfig(model=args.model, kv_cache_memory=256 * 2**20))
    stepper = EngineStepper(parts)
    spec = StructuredSpec(json_schema=json.dumps(SCHEMA))
    run(stepper, 2, 2, spec, "warmup")  # builds the llguidance tokenizer and warms the model
    plain = run(stepper, args.batch, args.steps, None, "plain")
    timers = (Timer(stepper.structured, "bitmask"), Timer(stepper.structured, "advance"))
    constrained = run(stepper, args.batch, args.steps, spec, "json", timers)
    plain_ms = statistics.median(r[0] for r in plain) * 1e3
    json_ms = statistics.median(r[0] for r in constrained) * 1e3
    mask_ms = statistics.median(r[1] for r in constrained) * 1e3
    advance_ms = statistics.median(r[2] for r in constrained) * 1e3
    # The same steps without their structured-output work: robust to the load swings of a shared machine.
    rest_ms = statistics.median(r[0] - r[1] - r[2] for r in constrained) * 1e3
    ratio = statistics.median((r[1] + r[2]) / (r[0] - r[1] - r[2]) for r in constrained)
    print(f"batch {args.batch}: {len(plain)} unconstrained and {len(constrained)} constrained decode steps")
    print(f"unconstrained step (separate run):        {plain_ms:9.2f} ms (median)")
    print(f"constrained step:                         {json_ms:9.2f} ms (median)")
    print(f"  mask computation (llguidance, batch):   {mask_ms:9.2f} ms/step")
    print(f"  matcher advance:                        {advance_ms:9.2f} ms/step")
    print(f"  the rest of the step (model, sampling): {rest_ms:9.2f} ms/step")
    print(f"mask + advance / rest of the same step:   {ratio:9.3f} (median over steps)")
    print(f"mask + advance / unconstrained step:      {(mask_ms + advance_ms) / plain_ms:9.3f}")


if __name__ == "__main__":
    main()
