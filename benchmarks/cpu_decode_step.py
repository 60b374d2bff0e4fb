"""One decode step of the default model on CPU: Tandem's model runner against transformers, same weights,
same dtype, same process, same threads. Prints ms per step and the ratio (transformers / Tandem: above 1
means Tandem is faster) for several batch sizes.

Both sides decode `batch` sequences whose contexts are `context` tokens long: Tandem through its paged KV
cache and the ModelRunner's whole step (inputs, forward, logits, greedy sampling, the one readback);
transformers through `model(input_ids, past_key_values=...)` with its dynamic cache and an argmax, the
way a plain transformers server would decode. Needs the dev extra (transformers).

Not the same weights in memory: Tandem dequantizes the GGUF (Q4_1) into dense float32/bfloat16 tensors,
while recent transformers keeps GGUF weights packed and dequantizes inside its matmuls (it warns that
this is fastest in float32). At batch 1 a decode step is bound by the bytes of weights read, so the
packed side reads about a quarter as many.

    .venv/bin/python benchmarks/cpu_decode_step.py                      # bfloat16, batch 1 and 8
    .venv/bin/python benchmarks/cpu_decode_step.py --dtype float32 --batch 1 4 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def time_steps(step, iters: int) -> float:  # noqa: ANN001 - a no-argument callable
    """Median milliseconds of `iters` calls after two warm-up calls."""
    step()
    step()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def tandem_step(dtype: str, batch: int, context: int, **config: object):  # noqa: ANN201
    """(a closure running one decode step of `batch` sequences through Tandem's engine pieces, the parts);
    config: more EngineConfig fields (benchmarks/tp_decode_step.py sets tensor_parallel_size)."""
    from engine.config import EngineConfig
    from engine.engine_setup import build_engine_parts
    from engine.request import Request
    from engine.scheduler import SchedulerOutput
    from protocol.messages import SamplingParams

    parts = build_engine_parts(
        EngineConfig(
            dtype=dtype,
            max_num_seqs=batch,
            kv_cache_memory=512 * 2**20,
            enable_prefix_caching=False,
            **config,  # type: ignore[arg-type]
        )
    )
    scheduler, runner = parts.scheduler, parts.runner
    for i in range(batch):
        prompt = [(7 * i + k) % 1000 + 10 for k in range(context)]
        sampling = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
        scheduler.add_request(Request(f"r{i}", b"bench", prompt, sampling, 0.0))
    while any(r.num_output_tokens == 0 for r in scheduler.running) or scheduler.num_waiting:
        out = scheduler.schedule()  # the prefills, chunked by the token budget
        scheduler.update_from_output(out, runner.execute(out))

    def step() -> None:
        out: SchedulerOutput = scheduler.schedule()
        assert len(out.scheduled) == batch and out.num_tokens == batch  # decode only
        scheduler.update_from_output(out, runner.execute(out))

    return step, parts


def transformers_step(dtype: torch.dtype, batch: int, context: int):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    from engine.loader import resolve_model_path

    path = resolve_model_path(None)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    ids = torch.tensor([[(7 * i + k) % 1000 + 10 for k in range(context)] for i in range(batch)])
    with torch.inference_mode():
        out = model(ids, use_cache=True)
    state = {"cache": out.past_key_values, "next": out.logits[:, -1].argmax(-1, keepdim=True)}

    @torch.inference_mode()
    def step() -> None:
        out = model(state["next"], past_key_values=state["cache"], use_cache=True)
        state["cache"], state["next"] = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence before timing")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per measurement")
    args = parser.parse_args()
    torch_dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, context {args.context}"
    )
    print(f"{'batch':>5} {'tandem ms':>10} {'transformers ms':>16} {'ratio':>6}")
    for batch in args.batch:
        step, parts = tandem_step(args.dtype, batch, args.context)
        assert parts.ready.model_dtype == args.dtype
        # Alternate the two so that machine noise falls on both alike; report the better round of each.
        ours, theirs = [], []
        reference = transformers_step(torch_dtype, batch, args.context)
        for _ in range(2):
            ours.append(time_steps(step, args.iters))
            theirs.append(time_steps(reference, args.iters))
        print(f"{batch:>5} {min(ours):>10.1f} {min(theirs):>16.1f} {min(theirs) / min(ours):>6.2f}")


if __name__ == "__main__":
    main()
