"""Batched LoRA's cost on CPU: one batch-8 decode step of the default model with 8 requests spread over
4 distinct adapters, against the same step of the base model, in one process, interleaved step by step.

Three engines are built from the same GGUF: `plain` (no --enable-lora, so no LoRA layer at all),
`lora-base` (LoRA on, the 8 requests name no adapter: the wrappers' cost when unused) and `lora-4`
(LoRA on with --max-loras 4, two requests per adapter). The adapters are random PEFT folders of the
given rank on all seven projections (q/k/v/o/gate/up/down). The ratio printed is lora-4 / plain:
issue 18 asks for at most 1.3.

    .venv/bin/python benchmarks/lora_overhead.py                # bfloat16, rank 16
    .venv/bin/python benchmarks/lora_overhead.py --dtype float32 --rank 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
TARGETS = {  # HF projection -> (input size, output size) in the default model
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
NUM_LAYERS = 30


def write_adapter(folder: Path, rank: int, seed: int) -> Path:
    """A random PEFT LoRA folder for the default model's Llama layout."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(NUM_LAYERS):
        for name, (fan_in, fan_out) in TARGETS.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def decode_step(config: object, batch: int, context: int, adapters: list[str]):  # noqa: ANN201
    """A closure running one decode step of `batch` sequences (request i under adapters[i % n], if any)."""
    from engine.engine_setup import build_engine_parts
    from engine.request import Request
    from protocol.messages import SamplingParams

    parts = build_engine_parts(config)  # type: ignore[arg-type]
    scheduler, runner = parts.scheduler, parts.runner
    for i in range(batch):
        prompt = [(7 * i + k) % 1000 + 10 for k in range(context)]
        sampling = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
        request = Request(f"r{i}", b"bench", prompt, sampling, 0.0)
        if adapters:
            assert parts.lora is not None
            request.lora = parts.lora.resolve(adapters[i % len(adapters)])
        scheduler.add_request(request)
    while any(r.num_output_tokens == 0 for r in scheduler.running) or scheduler.num_waiting:
        out = scheduler.schedule()  # the prefills, chunked by the token budget
        scheduler.update_from_output(out, runner.execute(out))

    def step() -> None:
        out = scheduler.schedule()
        assert len(out.scheduled) == batch and out.num_tokens == batch  # decode only, all 8 together
        scheduler.update_from_output(out, runner.execute(out))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--context", type=int, default=128, help="tokens per sequence before timing")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each engine, interleaved")
    args = parser.parse_args()
    import torch

    from engine.config import EngineConfig

    names = [f"adapter-{i}" for i in range(args.num_adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        modules = tuple(
            (name, str(write_adapter(Path(tmp) / name, args.rank, seed=i)), None)
            for i, name in enumerate(names)
        )
        common = {"dtype": args.dtype, "max_num_seqs": args.batch, "kv_cache_memory": 256 * 2**20}
        common["enable_prefix_caching"] = False
        lora = {"enable_lora": True, "lora_modules": modules, "max_loras": args.num_adapters}
        lora["max_lora_rank"] = args.rank
        steps = {
            "plain": decode_step(EngineConfig(**common), args.batch, args.context, []),
            "lora-base": decode_step(EngineConfig(**common, **lora), args.batch, args.context, []),
            "lora-4": decode_step(EngineConfig(**common, **lora), args.batch, args.context, names),
        }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, batch {args.batch}, "
        f"{args.num_adapters} adapters of rank {args.rank}, context {args.context}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    for step in steps.values():  # warm-up
        step()
        step()
    # Interleaved one step at a time, so load from other processes falls on all three alike; the
    # minimum is the step's cost with the least interference, the median what a busy machine gives.
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append((time.perf_counter() - start) * 1000)
    for name, values in samples.items():
        print(f"{name:>10}: min {min(values):7.1f} ms, median {statistics.median(values):7.1f} ms")
    for stat_name, stat in (("min", min), ("median", statistics.median)):
        plain = stat(samples["plain"])
        print(
            f"{stat_name}: lora-base / plain {stat(samples['lora-base']) / plain:.2f}, "
            f"lora-4 / plain {stat(samples['lora-4']) / plain:.2f}  (issue 18: at most 1.3)"
        )


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # this checkout's packages, not an installed copy
    from engine.cpu_threads import configure_openmp  # the engine process's OpenMP policy, before torch

    configure_openmp()
    main()
