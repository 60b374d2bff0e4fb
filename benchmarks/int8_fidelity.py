"""Fidelity of the CPU low-precision paths against float32, on the default model and a fixed prompt set:
top-1 agreement and mean |dlogprob| per position (teacher forcing). Candidates: bf16 (also with a float32
LM head, and with int8 decode weights), float16 through each of its matmul paths
(benchmarks/fp16_paths.py: the float16 GEMV/GEMM kernel, the float32 upcast, a bfloat16 copy), and what
`--dtype auto` gives with the GGUF block kernels (float32, block products, a float16 KV cache).

For each prompt, every position's next-token distribution is computed by the float32 model (the
reference, transformers-exact) and by the candidate; reported per candidate: the share of positions
whose argmax matches the reference's, and the mean over positions of |logprob_candidate(t) -
logprob_reference(t)| for t = the reference's top-1 token. A prefill has many rows, so each path is
forced for every row here (serving takes the few-row paths at decode and the many-row ones at prefill
and big batches): every position is scored on each path. Deterministic: rerunning prints the same.
The bound (issue 14): top-1 agreement >= 99% of positions, mean |dlogprob| small.

    .venv/bin/python benchmarks/int8_fidelity.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum, and its cafes.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Summarize: The meeting covered the quarterly budget, the hiring plan for the new office, and a "
    "proposal to move the weekly sync to Thursdays. Everyone agreed on the budget.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his clever cat.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. It happens mostly in the leaves.",
    "Q: What is 17 times 23?\nA: 17 times 23 is 391.\nQ: What is the square root of 144?\nA:",
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id GROUP BY name;",
]

# float16 path (benchmarks/fp16_paths.py) -> the label it is reported under
FP16_CANDIDATES = {
    "gemv-only": "float16, float16 kernel",  # what decode steps of <= MAX_FP16_ROWS rows run
    "upcast-only": "float16, float32 upcast",  # what bigger steps run (the engine's default)
    "bf16-wide": "float16, bf16 copy",  # the rejected alternative for bigger steps
}


def prompt_logprobs(parts: object, token_ids: list[int]) -> torch.Tensor:
    """[T, vocab] float32 log-probabilities of each position's next token, one prefill."""
    from engine.attention import AttentionMetadata

    runner = parts.runner  # type: ignore[attr-defined]
    n, bs = len(token_ids), runner.block_size
    num_blocks = -(-n // bs)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_table=torch.arange(1, num_blocks + 1, dtype=torch.int32).unsqueeze(0),
        slot_mapping=torch.arange(n, dtype=torch.int64) + bs,  # blocks 1.. (0 is the null block)
        max_query_len=n,
        max_seq_len=n,
        query_start_loc_cpu=[0, n],
        seq_lens_cpu=[n],
    )
    with torch.inference_mode():
        ids = torch.tensor(token_ids)
        hidden = runner.model(ids, torch.arange(n), runner.kv_caches, meta)
        return torch.log_softmax(runner.model.compute_logits(hidden).float(), dim=-1)


def main() -> None:
    from tokenizers import Tokenizer

    from benchmarks.fp16_paths import fp16_path
    from engine.config import EngineConfig
    from engine.engine_setup import build_engine_parts
    from engine.layers.int8_linear import use_int8_for_small_batches

    def parts(dtype: str, gguf_cpu_kernels: bool = False) -> object:
        # Dense weights unless asked: the float16/bfloat16 paths below are the dense matmuls'.
        config = EngineConfig(dtype=dtype, kv_cache_memory=64 * 2**20, gguf_cpu_kernels=gguf_cpu_kernels)
        return build_engine_parts(config)

    reference = parts("float32")  # dense float32 weights, float32 cache: transformers-exact
    tokenizer = Tokenizer.from_str(reference.ready.tokenizer_json)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    ref = [prompt_logprobs(reference, ids) for ids in prompts]
    lm_head_f32 = reference.runner.model.lm_head.weight.detach().clone()  # type: ignore[attr-defined]
    del reference

    def with_f32_head(candidate: object) -> list[torch.Tensor]:
        # The LM head is where near-ties are decided: does computing only it in float32 help?
        model = candidate.runner.model  # type: ignore[attr-defined]
        original = model.lm_head.forward
        model.lm_head.forward = lambda h: torch.nn.functional.linear(h.float(), lm_head_f32)
        try:
            return [prompt_logprobs(candidate, ids) for ids in prompts]
        finally:
            model.lm_head.forward = original

    candidates: dict[str, list[torch.Tensor]] = {}
    # --dtype auto on CPU with the GGUF block kernels: float32 with a float16 KV cache, blocks for every row.
    auto = parts("auto", gguf_cpu_kernels=True)
    assert auto.runner.kv_caches[0].dtype == torch.float16  # type: ignore[attr-defined]
    for module in auto.runner.model.modules():  # type: ignore[attr-defined]
        if getattr(module, "packed_weight", None) is not None:
            module.packed_weight.max_rows = 1 << 30
    candidates["auto: f32 + blocks + f16 KV"] = [prompt_logprobs(auto, ids) for ids in prompts]
    del auto
    low = parts("bfloat16")
    candidates["bfloat16"] = [prompt_logprobs(low, ids) for ids in prompts]
    candidates["bfloat16 + float32 LM head"] = with_f32_head(low)
    use_int8_for_small_batches(low.runner.model, max_int8_rows=1 << 30)  # type: ignore[attr-defined]
    candidates["bfloat16 + int8 weights"] = [prompt_logprobs(low, ids) for ids in prompts]
    del low
    low = parts("float16")
    for path, label in FP16_CANDIDATES.items():
        with fp16_path(path):
            candidates[label] = [prompt_logprobs(low, ids) for ids in prompts]
    with fp16_path("gemv-only"):
        candidates["float16 GEMV + float32 LM head"] = with_f32_head(low)
    del low
    num_positions = sum(len(ids) for ids in prompts)
    print(f"{len(prompts)} prompts, {num_positions} positions; reference: float32")
    print(f"{'candidate':<30} {'top-1 agreement':>16} {'mean |dlogprob|':>16} {'max |dlogprob|':>15}")
    for name, outs in candidates.items():
        agree, deltas = 0, []
        for r, c in zip(ref, outs, strict=True):
            top = r.argmax(-1)
            agree += int((c.argmax(-1) == top).sum())
            deltas.append((c.gather(-1, top[:, None]) - r.gather(-1, top[:, None])).abs().squeeze(-1))
        d = torch.cat(deltas)
        print(f"{name:<30} {agree / num_positions:>15.2%} {d.mean().item():>16.4f} {d.max().item():>15.4f}")


if __name__ == "__main__":
    main()
