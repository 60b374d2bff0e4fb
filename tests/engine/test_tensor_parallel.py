"""Tensor parallelism on CPU (gloo). TP=2 engines, with this test process as rank 0 and one spawned worker,
give TP=1's logits and greedy tokens on tiny Llama, Qwen2 and Qwen3 models: GQA with one KV head per rank,
a single KV head replicated on both ranks, tied and untied LM heads, and vocabularies that 2 does not divide."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.distributed.shard import HeadShard, TensorParallel, check_shardable, head_shard
from engine.engine_setup import EngineParts, build_engine_parts
from engine.loader import load_model
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, SamplingParams
from tests.engine.conftest import PagedBatchBuilder, build_tiny_hf_model, write_tokenizer_files

# case -> (tiny variant, changes to its shape)
CASES = {
    "llama-2kv": ("llama", {}),  # 4 query heads, 2 KV heads: one KV group per rank; untied LM head
    "qwen2-1kv-vocab511": ("qwen2", {"num_key_value_heads": 1, "vocab_size": 511}),  # replicated KV head
    "qwen3-2kv-vocab509": ("qwen3", {"vocab_size": 509}),  # q/k norms; tied head over a padded slice
}
PROMPT_LENGTHS = (5, 40, 17)  # 40 > max_num_batched_tokens: a chunked prefill
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tp_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for case, (variant, shape) in CASES.items():
        folder = tmp_path_factory.mktemp(f"tp-{case}")
        build_tiny_hf_model(variant, **shape).save_pretrained(folder)
        write_tokenizer_files(folder)
        folders[case] = folder
    return folders


def engine_config(model_dir: Path, tensor_parallel_size: int, **extra: object) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        kv_cache_memory=4 * 2**20,
        max_num_batched_tokens=32,
        tensor_parallel_size=tensor_parallel_size,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module", params=list(CASES))
def engines(
    request: pytest.FixtureRequest, tp_model_dirs: dict[str, Path]
) -> Iterator[tuple[EngineParts, EngineParts]]:
    """(TP=1, TP=2) engine parts of one case; the TP=2 worker is stopped afterwards."""
    threads = torch.get_num_threads()  # rank 0 takes cores / 2 threads; give the others theirs back
    folder = tp_model_dirs[request.param]
    tp1 = build_engine_parts(engine_config(folder, 1))
    tp2 = build_engine_parts(engine_config(folder, 2))
    assert tp2.tp_workers is not None and len(tp2.tp_workers.pids) == 1
    yield tp1, tp2
    tp2.tp_workers.stop()
    torch.set_num_threads(threads)


def forward_logits(
    parts: EngineParts, steps: list[dict[int, int]], embeds: bool = False
) -> list[torch.Tensor]:
    """Logits [T, vocab] of every token of each step, through the runner's model (rank 0's stand-in)."""
    builder = PagedBatchBuilder(64, parts.runner.block_size, seed=1)  # the same block ids on every engine
    gen = torch.Generator().manual_seed(0)
    model, out = parts.runner.model, []
    with torch.inference_mode():
        for step in steps:
            meta, positions = builder.step(step)
            ids = torch.randint(0, parts.vocab_size, positions.shape, generator=gen)
            inputs_embeds = model.embed_input_ids(ids) if embeds else None
            hidden = model(ids, positions, parts.runner.kv_caches, meta, inputs_embeds=inputs_embeds)
            out.append(model.compute_logits(hidden))
    return out


def test_tp2_logits_match_tp1(engines: tuple[EngineParts, EngineParts]) -> None:
    tp1, tp2 = engines
    # A mixed prefill, then decode rows that read the paged cache written by it.
    steps = [{0: 9, 1: 21}, {0: 1, 1: 1, 2: 6}, {0: 1, 1: 1, 2: 1}]
    for embeds in (False, True):  # token ids, and the prompt-embedding path (embed, then send the rows)
        for a, b in zip(forward_logits(tp1, steps, embeds), forward_logits(tp2, steps, embeds), strict=True):
            assert a.shape == b.shape == (a.shape[0], tp1.vocab_size)
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def greedy(parts: EngineParts) -> tuple[list[list[int]], list[float]]:
    """Greedy tokens of every prompt, and the logprobs of request 0's prompt (prompt_logprobs=1)."""
    stepper = EngineStepper(parts)
    gen = torch.Generator().manual_seed(3)
    tokens: dict[str, list[int]] = {}
    prompt_logprobs: list[float] = []
    for i, length in enumerate(PROMPT_LENGTHS):
        prompt = torch.randint(10, parts.vocab_size, (length,), generator=gen).tolist()
        sampling = SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, prompt_logprobs=1 if i == 0 else None
        )
        assert stepper.add(AddRequest(f"r{i}", prompt, sampling, time.time()), b"test", []) is None
        tokens[f"r{i}"] = []
    while stepper.has_work:
        for _client, delta in stepper.step():
            tokens[delta.request_id].extend(delta.new_token_ids)
            prompt_logprobs += [lp.logprob for lp in delta.prompt_logprobs or [] if lp is not None]
    return [tokens[f"r{i}"] for i in range(len(PROMPT_LENGTHS))], prompt_logprobs


def test_tp2_greedy_tokens_match_tp1(engines: tuple[EngineParts, EngineParts]) -> None:
    tp1, tp2 = engines
    tokens1, prompt_lps1 = greedy(tp1)
    tokens2, prompt_lps2 = greedy(tp2)
    assert all(len(t) == MAX_TOKENS for t in tokens1)
    assert tokens2 == tokens1
    assert len(prompt_lps1) == PROMPT_LENGTHS[0] - 1
    torch.testing.assert_close(torch.tensor(prompt_lps2), torch.tensor(prompt_lps1), atol=1e-4, rtol=0)


def test_tp2_repeated_prompt_copies_the_partial_block_on_every_rank(
    engines: tuple[EngineParts, EngineParts],
) -> None:
    """A prompt sent again reuses its partial last block: each rank copies its shard of those tokens' KV
    (the COPY command), so the second run's tokens and logprobs are the first's, and TP=1's."""
    prompt = torch.randint(
        10, engines[0].vocab_size, (21,), generator=torch.Generator().manual_seed(11)
    ).tolist()
    runs: list[tuple[list[int], list[float], int | None]] = []
    for parts in engines:
        stepper = EngineStepper(parts)
        for attempt in range(2):
            sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)
            assert (
                stepper.add(AddRequest(f"again-{attempt}", prompt, sampling, time.time()), b"t", []) is None
            )
            tokens, logprobs, cached = [], [], None
            while stepper.has_work:
                for _client, delta in stepper.step():
                    tokens.extend(delta.new_token_ids)
                    logprobs.extend(lp.logprob for lp in delta.logprobs or [])
                    cached = delta.num_cached_tokens if cached is None else cached
            runs.append((tokens, logprobs, cached))
    # Per engine: cold, then 16 whole-block tokens + 4 copied (the 21st is computed).
    assert [cached for _, _, cached in runs] == [0, 20, 0, 20]
    assert len({tuple(tokens) for tokens, _, _ in runs}) == 1 and len(runs[0][0]) == MAX_TOKENS
    for _, logprobs, _ in runs[1:]:
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(runs[0][1]), atol=1e-4, rtol=0)


def test_each_rank_loads_only_its_slice(tp_model_dirs: dict[str, Path]) -> None:
    """Shard shapes per rank, and the ranks' slices put back together are the whole weights."""
    folder = tp_model_dirs["qwen2-1kv-vocab511"]  # 4 query heads, 1 KV head, head_dim 16, vocab 511
    whole = load_model(str(folder), dtype="float32").model
    ranks = [load_model(str(folder), dtype="float32", tp=TensorParallel(r, 2)).model for r in range(2)]
    attn = [m.model.layers[0].self_attn for m in ranks]
    assert [(a.num_heads, a.num_kv_heads) for a in attn] == [(2, 1), (2, 1)]
    assert attn[0].qkv_proj.weight.shape == (2 * 16 + 2 * 16, 64)  # 2 query heads + the shared K and V
    full_qkv = whole.model.layers[0].self_attn.qkv_proj.weight
    q_parts = [a.qkv_proj.weight[:32] for a in attn]
    torch.testing.assert_close(torch.cat(q_parts), full_qkv[:64], atol=0, rtol=0)
    for a in attn:  # the single KV head is replicated
        torch.testing.assert_close(a.qkv_proj.weight[32:], full_qkv[64:], atol=0, rtol=0)
    o_parts = [a.o_proj.weight for a in attn]
    torch.testing.assert_close(torch.cat(o_parts, dim=1), whole.model.layers[0].self_attn.o_proj.weight)
    embeds = [m.model.embed_tokens.weight for m in ranks]
    assert [e.shape[0] for e in embeds] == [256, 256]  # ceil(511 / 2), the last row of rank 1 padding
    torch.testing.assert_close(torch.cat(embeds)[:511], whole.model.embed_tokens.weight, atol=0, rtol=0)
    assert not embeds[1][-1].any()


@pytest.mark.parametrize(
    ("size", "num_heads", "num_kv_heads", "expected"),
    [
        (2, 9, 3, [HeadShard(0, 3, 0, 1), HeadShard(3, 9, 1, 3)]),  # SmolLM2: uneven whole KV groups
        (2, 4, 1, [HeadShard(0, 2, 0, 1), HeadShard(2, 4, 0, 1)]),  # one KV head, replicated
        (
            4,
            8,
            2,
            [HeadShard(0, 2, 0, 1), HeadShard(2, 4, 0, 1), HeadShard(4, 6, 1, 2), HeadShard(6, 8, 1, 2)],
        ),
        (8, 64, 8, [HeadShard(8 * r, 8 * r + 8, r, r + 1) for r in range(8)]),  # Llama-3.1-70B at TP=8
    ],
)
def test_head_shards(size: int, num_heads: int, num_kv_heads: int, expected: list[HeadShard]) -> None:
    assert [head_shard(TensorParallel(r, size), num_heads, num_kv_heads) for r in range(size)] == expected


@pytest.mark.parametrize(
    ("size", "num_heads", "num_kv_heads", "message"),
    [(3, 4, 2, "must divide or be a multiple"), (4, 2, 1, "without query heads")],
)
def test_unshardable_head_layouts_are_refused(
    size: int, num_heads: int, num_kv_heads: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_shardable(
            size, num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=128, vocab_size=512
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tensor_parallel_size": 3}, "must divide or be a multiple"),  # 2 KV heads over 3 ranks
        ({"cpu_int8_weights": True}, "--cpu-int8-weights"),
        ({"enable_lora": True}, "--enable-lora"),
    ],
)
def test_unsupported_combinations_fail_at_start_up(
    tp_model_dirs: dict[str, Path], extra: dict[str, object], message: str
) -> None:
    config = engine_config(tp_model_dirs["llama-2kv"], 2)
    with pytest.raises(ValueError, match=message):
        build_engine_parts(EngineConfig(**{**config.__dict__, **extra}))  # refused before any worker starts


def test_embedding_engines_refuse_tensor_parallelism_before_loading() -> None:
    from engine.embedding_runner import build_embedding_parts

    config = EngineConfig(task="embed", device="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="text generation only"):
        build_embedding_parts(config)


HUNG_WORKER_SCRIPT = """
import os, signal, sys, time
from engine.config import EngineConfig
from engine.engine_setup import build_engine_parts
from engine.stepper import EngineStepper
from protocol.messages import AddRequest, SamplingParams

config = EngineConfig(model=sys.argv[1], device="cpu", dtype="float32", kv_cache_memory=2**22,
                      tensor_parallel_size=2, tensor_parallel_timeout_s=float(sys.argv[2]))
parts = build_engine_parts(config)
stepper = EngineStepper(parts)
stepper.add(AddRequest("r0", [11, 12, 13], SamplingParams(max_tokens=4), time.time()), b"t", [])
os.kill(parts.tp_workers.pids[0], signal.SIGSTOP)  # alive but never answering
print("stepping", flush=True)
stepper.step()
print("step returned", flush=True)
"""


def test_hung_worker_ends_the_engine_within_the_timeout(tp_model_dirs: dict[str, Path]) -> None:
    """A rank that stops answering (SIGSTOP: its process is alive) must not hang rank 0 forever: the step
    watchdog (or gloo's own timeout) ends the engine process with code 1, which the launcher restarts."""
    folder = str(tp_model_dirs["llama-2kv"])
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HUNG_WORKER_SCRIPT, folder, "2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stepping" in proc.stdout and "step returned" not in proc.stdout
    assert "the engine stops so that it can be restarted" in proc.stderr
    assert time.monotonic() - started < 60  # start-up and the 2 s timeout; the default would be 300 s


def test_without_tensor_parallelism_the_model_keeps_plain_layers(tp_model_dirs: dict[str, Path]) -> None:
    """TP=1 builds exactly the layers it built before TP existed: no collective on its path."""
    from engine.layers.embedding import LMHead, VocabEmbedding
    from engine.layers.linear import Linear, MergedLinear

    model = load_model(str(tp_model_dirs["llama-2kv"]), dtype="float32").model
    layer = model.model.layers[0]
    assert type(layer.self_attn.qkv_proj) is MergedLinear and type(layer.mlp.gate_up_proj) is MergedLinear
    # Linear: nn.Linear with the CPU float16 row routing, not RowParallelLinear's all-reduce
    assert type(layer.self_attn.o_proj) is Linear and type(layer.mlp.down_proj) is Linear
    assert type(model.model.embed_tokens) is VocabEmbedding and type(model.lm_head) is LMHead
