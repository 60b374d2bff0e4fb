"""GPU benchmark for Tandem's Triton kernels: copy bandwidth, paged-attention decode bandwidth, and the decode
step of a Llama-3.1-8B-shaped model (random bf16 weights) against the memory roofline.

Run from the repository root on a CUDA machine:  python benchmarks/gpu/bench_gpu.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # so `engine` imports from a plain checkout

from engine.attention import AttentionMetadata  # noqa: E402

BLOCK_SIZE = 16
GB = 1e9


def time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Mean milliseconds per call of fn, measured with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth(num_bytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters)
    return 2 * num_bytes / (ms / 1e3) / GB


def decode_metadata(batch: int, context: int, device: str, gen: torch.Generator) -> AttentionMetadata:
    """A decode-only batch: every sequence has `context` tokens (the last one new), blocks shuffled in the pool."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    block_table = torch.randperm(batch * blocks_per_seq, generator=gen).view(batch, blocks_per_seq)
    last = context - 1
    slot_mapping = block_table[:, last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE
    return AttentionMetadata(
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        block_table=block_table.to(dtype=torch.int32, device=device),
        slot_mapping=slot_mapping.to(device),
        max_query_len=1,
        max_seq_len=context,
        query_start_loc_cpu=list(range(batch + 1)),
        seq_lens_cpu=[context] * batch,
    )


def _time_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, split_kv: bool, iters: int
) -> float:
    from engine.kernels import triton_ops

    scale = q.shape[-1] ** -0.5
    return time_ms(lambda: triton_ops.paged_attention(q, kv_cache, meta, scale, split_kv=split_kv), iters)


def bench_attention(copy_gbps: float, iters: int) -> None:
    from engine.kernels import triton_ops

    num_q_heads, num_kv_heads, head_size = 32, 8, 128  # Llama-3.1-8B attention
    gen = torch.Generator().manual_seed(0)
    print("\npaged attention, decode, 32 q heads / 8 KV heads / head_dim 128, bf16, block 16")
    print(f"{'batch':>5} {'context':>7} {'path':>6} {'us':>9} {'GB/s':>8} {'of copy':>8}")
    for batch in (1, 8, 64):
        for context in (1024, 8192, 32768):
            meta = decode_metadata(batch, context, "cuda", gen)
            num_blocks = batch * -(-context // BLOCK_SIZE)
            kv_cache = torch.empty(
                2, num_blocks, BLOCK_SIZE, num_kv_heads, head_size, dtype=torch.bfloat16, device="cuda"
            ).normal_()
            q = torch.randn(batch, num_q_heads, head_size, dtype=torch.bfloat16, device="cuda")
            kv_bytes = 2 * batch * context * num_kv_heads * head_size * kv_cache.element_size()
            auto = triton_ops.should_split_kv(meta, num_kv_heads, 512)
            for split_kv in (False, True):
                ms = _time_attention(q, kv_cache, meta, split_kv, iters)
                gbps = kv_bytes / (ms / 1e3) / GB
                path = ("split" if split_kv else "single") + ("*" if split_kv == auto else "")
                print(
                    f"{batch:>5} {context:>7} {path:>6} {ms * 1e3:>9.1f} {gbps:>8.0f} {gbps / copy_gbps:>8.1%}"
                )
            del kv_cache
            torch.cuda.empty_cache()
    print("(* = the path the heuristic picks; GB/s = K/V bytes read / time)")


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_size: int = 128
    vocab_size: int = 128256
    rope_theta: float = 500000.0
    eps: float = 1e-5


class DecoderStack:
    """A Llama-shaped decoder with random weights, built from Tandem's Triton ops and torch matmuls."""

    def __init__(self, shape: ModelShape, max_tokens: int, num_blocks: int, device: str, dtype: torch.dtype):
        self.shape = s = shape
        gen = torch.Generator(device=device).manual_seed(0)

        def weight(*dims: int) -> torch.Tensor:
            return torch.empty(*dims, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)

        qkv_size = (s.num_q_heads + 2 * s.num_kv_heads) * s.head_size
        self.embed = weight(s.vocab_size, s.hidden_size)
        self.lm_head = weight(s.vocab_size, s.hidden_size)
        self.final_norm = torch.ones(s.hidden_size, dtype=dtype, device=device)
        self.layers = [
            {
                "input_norm": torch.ones(s.hidden_size, dtype=dtype, device=device),
                "qkv": weight(qkv_size, s.hidden_size),
                "o": weight(s.hidden_size, s.num_q_heads * s.head_size),
                "post_norm": torch.ones(s.hidden_size, dtype=dtype, device=device),
                "gate_up": weight(2 * s.intermediate_size, s.hidden_size),
                "down": weight(s.hidden_size, s.intermediate_size),
            }
            for _ in range(s.num_layers)
        ]
        self.kv_caches = [
            torch.zeros(2, num_blocks, BLOCK_SIZE, s.num_kv_heads, s.head_size, dtype=dtype, device=device)
            for _ in range(s.num_layers)
        ]
        inv_freq = 1.0 / s.rope_theta ** (
            torch.arange(0, s.head_size, 2, device=device).float() / s.head_size
        )
        freqs = torch.outer(torch.arange(max_tokens, device=device).float(), inv_freq)
        self.cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_tokens, head_size]

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights a decode step reads (every matrix once; the embedding only its looked-up rows)."""
        per_layer = sum(t.numel() * t.element_size() for t in self.layers[0].values())
        return per_layer * self.shape.num_layers + self.lm_head.numel() * self.lm_head.element_size()

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        from engine.kernels import triton_ops as ops

        s = self.shape
        num_tokens = token_ids.shape[0]
        q_size, kv_size = s.num_q_heads * s.head_size, s.num_kv_heads * s.head_size
        hidden = self.embed[token_ids]  # [T, hidden]
        residual = torch.zeros_like(hidden)
        for layer, kv_cache in zip(self.layers, self.kv_caches, strict=True):
            x, residual = ops.fused_add_rms_norm(hidden, residual, layer["input_norm"], s.eps)
            qkv = x @ layer["qkv"].t()  # [T, q_size + 2 * kv_size]
            q = qkv[:, :q_size].view(num_tokens, s.num_q_heads, s.head_size)
            k = qkv[:, q_size : q_size + kv_size].view(num_tokens, s.num_kv_heads, s.head_size)
            v = qkv[:, q_size + kv_size :].view(num_tokens, s.num_kv_heads, s.head_size)
            q, k = ops.rotary_embedding(positions, q, k, self.cos_sin_cache, True)
            ops.write_kv_cache(k, v, kv_cache, meta.slot_mapping)
            attn = ops.paged_attention(q, kv_cache, meta, s.head_size**-0.5)
            hidden = attn.view(num_tokens, q_size) @ layer["o"].t()
            x, residual = ops.fused_add_rms_norm(hidden, residual, layer["post_norm"], s.eps)
            hidden = ops.silu_and_mul(x @ layer["gate_up"].t()) @ layer["down"].t()
        x, _ = ops.fused_add_rms_norm(hidden, residual, self.final_norm, s.eps)
        return x @ self.lm_head.t()  # [T, vocab]


def bench_model(copy_gbps: float, context: int, iters: int, use_graph: bool) -> None:
    shape = ModelShape()
    batches = (1, 16, 64)
    gen = torch.Generator().manual_seed(0)
    num_blocks = max(batches) * -(-context // BLOCK_SIZE)
    model = DecoderStack(shape, context, num_blocks, "cuda", torch.bfloat16)
    print(f"\nLlama-3.1-8B-shaped decode step (random bf16 weights), context {context} per sequence")
    print(f"{'batch':>5} {'mode':>6} {'ms':>8} {'roofline ms':>11} {'of roofline':>11} {'tok/s':>8}")
    for batch in batches:
        meta = decode_metadata(batch, context, "cuda", gen)
        token_ids = torch.randint(0, shape.vocab_size, (batch,), generator=gen).cuda()
        positions = torch.full((batch,), context - 1, dtype=torch.int64, device="cuda")
        kv_bytes = 2 * batch * context * shape.num_kv_heads * shape.head_size * 2 * shape.num_layers
        roofline_ms = (model.weight_bytes_per_step() + kv_bytes) / (copy_gbps * GB) * 1e3
        modes: list[tuple[str, Callable[[], object]]] = [
            ("eager", lambda meta=meta, t=token_ids, p=positions: model.forward(t, p, meta))
        ]
        if use_graph:
            modes.append(
                (
                    "graph",
                    capture_graph(lambda meta=meta, t=token_ids, p=positions: model.forward(t, p, meta)),
                )
            )
        for mode, fn in modes:
            ms = time_ms(fn, iters)
            print(
                f"{batch:>5} {mode:>6} {ms:>8.2f} {roofline_ms:>11.2f} {roofline_ms / ms:>11.1%} "
                f"{batch / (ms / 1e3):>8.0f}"
            )
    print("(roofline = (weight bytes + K/V bytes read per step) / copy bandwidth)")


def capture_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """Captures fn (already warmed up here, so Triton has compiled) into a CUDA graph and returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    parser.add_argument("--context", type=int, default=1024, help="context length per sequence for the model")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--no-graph", action="store_true", help="time the model eagerly only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "bench_gpu.py needs a CUDA device, and none is visible here (torch.cuda.is_available() is False)."
        )
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s (read + write)")
    if not args.skip_attention:
        bench_attention(copy_gbps, args.iters)
    if not args.skip_model:
        bench_model(copy_gbps, args.context, args.iters, not args.no_graph)


if __name__ == "__main__":
    main()
