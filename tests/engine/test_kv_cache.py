"""Block pool and prefix caching: reuse, LRU eviction, salts, and no leaks."""

from __future__ import annotations

from engine.kv_cache import BlockCopy, CachedTail, KVCacheManager
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
    kv.record_prefix_lookup(request, num_cached)
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


def admit_with_tail(kv: KVCacheManager, request: Request) -> BlockCopy | None:
    """Admits like the scheduler does: whole cached blocks, then a cached partial block to copy from.
    Returns the copy (its source stays pinned until release_copy_source)."""
    cached = kv.find_cached_prefix(request)
    tail = kv.find_cached_tail(request, len(cached))
    num_cached = len(cached) * kv.block_size + (tail.num_tokens if tail else 0)
    assert kv.allocate_slots(request, request.num_tokens - num_cached, cached, tail)
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return None if tail is None else BlockCopy(tail.block_id, request.block_ids[len(cached)], tail.num_tokens)


def test_a_repeated_prompt_copies_the_start_of_the_block_where_the_first_one_ended() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK, enable_prefix_caching=True)
    prompt = list(range(100, 111))  # 2 whole blocks + 3 tokens
    first = make_request("a", prompt)
    assert admit_with_tail(kv, first) is None
    first_blocks = list(first.block_ids)
    kv.free(first)
    again = make_request("b", prompt)
    copy = admit_with_tail(kv, again)
    # Blocks 0-1 shared; of block 2's tokens [108, 109, 110] all but the last prompt token are copied.
    assert copy == BlockCopy(first_blocks[2], again.block_ids[2], 2)
    assert again.block_ids[:2] == first_blocks[:2] and again.block_ids[2] != first_blocks[2]
    assert kv.pool.ref_counts[copy.src] == 1  # pinned until the step has copied it
    kv.release_copy_source(copy)
    assert kv.pool.ref_counts[copy.src] == 0 and copy.src in kv.pool.free_blocks
    assert kv.num_hit_tokens == 0  # admit_with_tail does not count; the scheduler does


def test_the_next_turn_of_a_chat_copies_the_answers_last_tokens() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=BLOCK, enable_prefix_caching=True)
    prompt = [*range(100, 111), 7]  # 3 whole blocks
    reply = make_request("a", prompt)
    reply.output_token_ids.extend([1, 2, 3])  # positions 12-14
    admit_with_tail(kv, reply)
    reply.num_computed_tokens = 14  # the last sampled token (3) is never computed
    reply_blocks = list(reply.block_ids)
    kv.free(reply)
    turn = make_request("b", [*prompt, 1, 2, 3, 4, 5])  # the history, then the user's new tokens
    cached = kv.find_cached_prefix(turn)
    assert cached == reply_blocks[:3]
    assert kv.find_cached_tail(turn, len(cached)) == CachedTail(reply_blocks[3], 2)  # tokens 1, 2


def test_partial_blocks_follow_their_parents_salt_and_are_forgotten_when_reused() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BLOCK, enable_prefix_caching=True)  # 5 usable
    prompt = [5, 6, 7]  # shorter than a block: only the chain's root keys precede it
    first = make_request("a", prompt, salt="tenant-1")
    admit_with_tail(kv, first)
    block = first.block_ids[0]
    kv.free(first)
    assert kv.find_cached_tail(make_request("b", prompt, salt="tenant-2"), 0) is None
    assert kv.find_cached_tail(make_request("c", prompt), 0) is None  # no salt: another chain
    assert kv.find_cached_tail(make_request("d", prompt, salt="tenant-1"), 0) == CachedTail(block, 2)
    # Prompt logprobs need every position computed: such a request reads no cache at all.
    sampling = SamplingParams(max_tokens=8, prompt_logprobs=1)
    assert (
        kv.find_cached_tail(Request("e", b"client", prompt, sampling, 0.0, cache_salt="tenant-1"), 0) is None
    )
    # Once the block is handed out again its contents change: the record goes with it.
    filler = make_request("filler", list(range(500, 520)))  # all 5 blocks
    admit_with_tail(kv, filler)
    assert kv.find_cached_tail(make_request("f", prompt, salt="tenant-1"), 0) is None
    kv.free(filler)
    assert kv.num_free_blocks == 5


def test_a_copy_source_that_would_leave_no_room_is_not_taken() -> None:
    from engine.scheduler import Scheduler, SchedulerLimits

    kv = KVCacheManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)  # 3 usable
    first = make_request("a", list(range(10)))  # the whole pool; ends 2 tokens into block 2
    admit_with_tail(kv, first)
    kv.free(first)
    scheduler = Scheduler(SchedulerLimits(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=64), kv)
    # Blocks 0-1 cached, and a's block 2 holds tokens 8, 9: but pinning it as well as the two cached
    # blocks leaves no free block for the request's own block 2, so it is admitted without the copy.
    scheduler.add_request(make_request("b", [*range(10), 60, 61]))
    out = scheduler.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("b", 4)] and out.block_copies == []


def test_a_request_that_failed_leaves_nothing_to_reuse() -> None:
    from engine.scheduler import Scheduler, SchedulerLimits

    kv = KVCacheManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    scheduler = Scheduler(SchedulerLimits(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=64), kv)
    prompt = list(range(100, 110))  # 2 whole blocks + 2 tokens

    def tail_for(request_id: str) -> CachedTail | None:
        request = make_request(request_id, prompt)
        return kv.find_cached_tail(request, len(kv.find_cached_prefix(request)))

    failed = make_request("a", prompt)
    scheduler.add_request(failed)
    scheduler.schedule()
    failed.num_computed_tokens = len(prompt)  # as if its step had run, then it failed
    scheduler.finish_with_error(failed)
    assert tail_for("b") is None
    ok = make_request("c", prompt)
    admit_with_tail(kv, ok)
    block = ok.block_ids[2]
    kv.free(ok)
    assert tail_for("d") == CachedTail(block, 1)
