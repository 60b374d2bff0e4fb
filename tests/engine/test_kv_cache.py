"""Block pool and prefix caching: reuse, LRU eviction, salts, and no leaks."""

from __future__ import annotations

from engine.kv_cache import KVCacheManager
from engine.request import Request
from protocol.messages import SamplingParams

BLOCK = 4


def make_request(request_id: str, prompt: list[int], salt: str | None = None) -> Request:
    return Request(request_id, b"client", prompt, SamplingParams(max_tokens=8), 0.0, cache_salt=salt)


def admit(kv: KVCacheManager, request: Request) -> int:
    """Allocates like the scheduler does for a whole prompt; returns the cached token count."""
    cached = kv.find_cached_prefix(request)
    num_cached = len(cached) * kv.block_size
    assert kv.allocate_slots(request, request.num_tokens - num_cached, cached)
    kv.record_prefix_lookup(request, len(cached))
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return num_cached


def test_blocks_return_to_pool_after_free() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    total = kv.num_free_blocks
    requests = [make_request(f"r{i}", list(range(i, i + 10))) for i in range(3)]
    for r in requests:
        admit(kv, r)
    assert kv.num_free_blocks == total - 3 * 3
    for r in requests:
        kv.free(r)
    assert kv.num_free_blocks == total
    assert kv.usage == 0.0


def test_shared_prefix_is_reused_and_last_token_recomputed() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK, enable_prefix_caching=True)
    prefix = list(range(100, 112))  # 3 full blocks
    first = make_request("a", prefix + [1, 2])
    assert admit(kv, first) == 0
    second = make_request("b", prefix + [7, 8])
    assert admit(kv, second) == 12
    assert second.block_ids[:3] == first.block_ids[:3]
    # A prompt that is exactly the cached blocks still computes its last token.
    exact = make_request("c", prefix)
    assert admit(kv, exact) == 8
    for r in (first, second, exact):
        kv.free(r)
    assert kv.num_free_blocks == 31
    assert kv.num_hit_tokens == 20


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    kv = KVCacheManager(num_blocks=7, block_size=BLOCK, enable_prefix_caching=True)  # 6 usable
    old = make_request("old", list(range(8)) + [99])  # 2 full blocks + 1
    admit(kv, old)
    kv.free(old)
    again = make_request("again", list(range(8)) + [98])
    assert admit(kv, again) == 8  # still cached after free
    kv.free(again)
    # Filling the pool with other prompts evicts the old blocks (least recently freed first).
    filler = make_request("filler", list(range(500, 523)))  # 6 blocks
    admit(kv, filler)
    kv.free(filler)
    late = make_request("late", list(range(8)) + [97])
    assert admit(kv, late) == 0


def test_cache_salt_isolates_prefixes() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK, enable_prefix_caching=True)
    prompt = list(range(20))
    admit(kv, make_request("a", prompt, salt="tenant-1"))
    assert admit(kv, make_request("b", prompt, salt="tenant-2")) == 0
    assert admit(kv, make_request("c", prompt, salt="tenant-1")) == 16


def test_disabled_prefix_caching_never_hits() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK, enable_prefix_caching=False)
    admit(kv, make_request("a", list(range(20))))
    assert admit(kv, make_request("b", list(range(20)))) == 0


def test_allocation_fails_cleanly_when_out_of_blocks() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)  # 3 usable
    big = make_request("big", list(range(20)))  # needs 5 blocks
    assert not kv.allocate_slots(big, big.num_tokens)
    assert big.block_ids == []
    assert kv.num_free_blocks == 3
