"""Compiles every Triton kernel for real NVIDIA targets (sm_80, sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but it accepts programs the real
compiler rejects (tl.dot shapes, dtype mixes, control flow). This script runs the public kernel wrappers
with CPU tensors while every launch is intercepted: instead of running, the launch is specialized exactly
as Triton's own launcher would do on a GPU (argument types, 16-byte alignment, divisibility) and compiled
ahead of time down to a cubin with the ptxas that ships in the triton wheel. Each kernel's shared memory
must fit the target, and ptxas's resource report says whether registers spilled.

Run in a fresh interpreter without TRITON_INTERPRET (the kernels must be JITFunctions, not interpreted):
    python -m tests.engine.kernels.gpu_compile_check [--targets 80,90] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from engine.attention import AttentionMetadata
from engine.kernels import triton_attention, triton_elementwise

# Largest shared memory one block may use (opt-in), in bytes: A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class CompiledCase:
    case: str
    kernel: str
    arch: int
    num_warps: int
    shared_bytes: int
    registers: int
    spill_bytes: int  # local memory per thread: > 0 means registers spilled
    build: str  # Triton's hash of the compiled kernel: equal for launches that share a specialization


@contextmanager
def intercept_launches(record: Callable[[JITFunction, tuple, dict], None]) -> Iterator[None]:
    """Every `kernel[grid](...)` calls record(kernel, args, kwargs) instead of launching."""
    original = JITFunction.run

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        record(self, args, kwargs)

    JITFunction.run = run  # type: ignore[method-assign]
    original_gpu_check = triton_attention._runs_on_gpu
    # The wrappers choose GPU settings (no upcast, tensor-core dot precision) as they would for CUDA tensors.
    triton_attention._runs_on_gpu = lambda tensor: True  # type: ignore[assignment]
    try:
        yield
    finally:
        JITFunction.run = original  # type: ignore[method-assign]
        triton_attention._runs_on_gpu = original_gpu_check  # type: ignore[assignment]


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict, arch: int) -> Any:
    """Specializes one intercepted launch as Triton's launcher does, then compiles it for sm_<arch>."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread) from cuobjdump's report on the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run(
            [_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+).*LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report:\n{report}")
    return int(match.group(1)), int(match.group(2))


# -- the launches to compile: the shapes and dtypes the engine uses ---------------------------------------


def _metadata(seqs: list[tuple[int, int]], block_size: int) -> AttentionMetadata:
    """seqs: (seq_len, q_len). Block tables are contiguous: only types and shapes matter here."""
    loc = [0]
    for _, q_len in seqs:
        loc.append(loc[-1] + q_len)
    max_blocks = max(-(-s // block_size) for s, _ in seqs)
    table = torch.arange(len(seqs) * max_blocks, dtype=torch.int32).view(len(seqs), max_blocks)
    return AttentionMetadata(
        query_start_loc=torch.tensor(loc, dtype=torch.int32),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
        block_table=table,
        slot_mapping=torch.zeros(loc[-1], dtype=torch.int64),
        max_query_len=max(q for _, q in seqs),
        max_seq_len=max(s for s, _ in seqs),
        query_start_loc_cpu=loc,
        seq_lens_cpu=[s for s, _ in seqs],
    )


ATTENTION_BATCHES = {
    "mixed": [(40, 40), (300, 1), (90, 20)],  # prefill, decode and a chunk in one launch
    "decode": [(300, 1), (1500, 1)],  # single pass, one query token per sequence
    "split-kv": [(600, 1), (1500, 1)],
}


def _attention(dtype: torch.dtype, head_size: int, num_kv_heads: int, group: int, batch: str) -> None:
    block_size = 16
    seqs = ATTENTION_BATCHES[batch]
    split = batch == "split-kv"
    meta = _metadata(seqs, block_size)
    num_blocks = int(meta.block_table.numel())
    q = torch.empty(meta.query_start_loc_cpu[-1], num_kv_heads * group, head_size, dtype=dtype)
    kv_cache = torch.empty(2, num_blocks, block_size, num_kv_heads, head_size, dtype=dtype)
    triton_attention.paged_attention(q, kv_cache, meta, head_size**-0.5, split_kv=split)


def _elementwise(dtype: torch.dtype, hidden: int, heads: int, kv_heads: int, head_size: int) -> None:
    tokens = 7
    x = torch.empty(tokens, hidden, dtype=dtype)
    weight = torch.empty(hidden, dtype=dtype)
    triton_elementwise.rms_norm(x, weight, 1e-5)
    triton_elementwise.fused_add_rms_norm(x, torch.empty_like(x), weight, 1e-5)
    triton_elementwise.silu_and_mul(torch.empty(tokens, 2 * 4 * hidden, dtype=dtype))
    positions = torch.zeros(tokens, dtype=torch.int64)
    q = torch.empty(tokens, heads, head_size, dtype=dtype)
    k = torch.empty(tokens, kv_heads, head_size, dtype=dtype)
    cos_sin = torch.empty(4096, head_size, dtype=torch.float32)
    for is_neox in (True, False):
        triton_elementwise.rotary_embedding(positions, q, k, cos_sin, is_neox)
    kv_cache = torch.empty(2, 8, 16, kv_heads, head_size, dtype=dtype)
    triton_elementwise.write_kv_cache(k, torch.empty_like(k), kv_cache, positions)


def cases(full: bool) -> dict[str, Callable[[], None]]:
    """name -> a call of the public wrappers whose launches get compiled."""
    out: dict[str, Callable[[], None]] = {}
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if full else [torch.bfloat16]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        # SmolLM2-135M (576 hidden, 9 q / 3 KV heads of 64) and Llama-3.1-8B (4096, 32 / 8 of 128).
        out[f"elementwise {name} smollm2"] = lambda d=dtype: _elementwise(d, 576, 9, 3, 64)
        out[f"elementwise {name} llama-8b"] = lambda d=dtype: _elementwise(d, 4096, 32, 8, 128)
        head_sizes = [64, 80, 96, 128] if dtype == torch.bfloat16 else [128]
        groups = [1, 3, 4, 8] if dtype == torch.bfloat16 else [4]
        for head_size in head_sizes:
            for group in groups:
                for batch in ATTENTION_BATCHES:
                    label = f"attention {name} d{head_size} gqa{group} {batch}"
                    out[label] = lambda d=dtype, h=head_size, g=group, b=batch: _attention(d, h, 2, g, b)
    return out


def _compile_cases(names: list[str], archs: list[int], full: bool) -> list[CompiledCase]:
    """Records the launches of the named cases, then compiles each for every arch (one worker's share)."""
    launches: list[tuple[str, JITFunction, tuple, dict]] = []
    all_cases = cases(full)
    for name in names:
        with intercept_launches(lambda fn, args, kwargs, n=name: launches.append((n, fn, args, kwargs))):
            all_cases[name]()
    results = []
    for case, fn, args, kwargs in launches:
        for arch in archs:
            kernel = compile_launch(fn, args, kwargs, arch)
            registers, spill = resource_usage(kernel.asm["cubin"])
            results.append(
                CompiledCase(
                    case,
                    fn.__name__,
                    arch,
                    kernel.metadata.num_warps,
                    kernel.metadata.shared,
                    registers,
                    spill,
                    kernel.hash,
                )
            )
    return results


def compile_all(archs: list[int], full: bool, jobs: int) -> list[CompiledCase]:
    """Every case's launches compiled for every arch, on `jobs` processes; one row per distinct kernel build."""
    names = list(cases(full))
    shares = [names[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        per_worker = list(pool.map(_compile_cases, shares, [archs] * jobs, [full] * jobs))
    order = {name: i for i, name in enumerate(names)}
    rows = sorted((r for rs in per_worker for r in rs), key=lambda r: (order[r.case], r.arch))
    distinct: dict[tuple[int, str], CompiledCase] = {}
    for r in rows:  # several launches can share one specialization: keep its first case
        distinct.setdefault((r.arch, r.build), r)
    return list(distinct.values())


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--quick", action="store_true", help="bfloat16 only")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    opts = parser.parse_args(argv)
    results = compile_all([int(a) for a in opts.targets.split(",")], not opts.quick, max(1, opts.jobs))
    print(f"{'kernel':32} {'arch':>5} {'warps':>5} {'shared':>7} {'regs':>4} {'spill':>5}  first case")
    for r in results:
        print(
            f"{r.kernel:32} sm_{r.arch:<2} {r.num_warps:5} {r.shared_bytes:7} {r.registers:4} "
            f"{r.spill_bytes:5}  {r.case}"
        )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    too_big = [r for r in results if r.shared_bytes > SHARED_LIMIT[r.arch]]
    for r in too_big:
        print(f"TOO MUCH SHARED MEMORY: {r}", file=sys.stderr)
    return 1 if too_big else 0


if __name__ == "__main__":
    raise SystemExit(main())
