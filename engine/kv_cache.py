"""Paged KV-cache bookkeeping: a reference-counted block pool with prefix caching by chained block hashes.

Pure Python, no torch: the tensors live in the model runner; this module only decides which block ids
each request owns. Block 0 is the null block (never handed out): padded slots may write there.

Whole blocks are shared by hash. Past the last whole cached block, a prompt that repeats where an earlier
request's tokens ended (the same prompt again, the next turn of a chat) also reuses that block's first
tokens: the scheduler plans a BlockCopy of their slots into the new request's own block, and the model
runner copies them before the step. Without it a repeated 94-token prompt recomputed its last 14 tokens
where llama-server computes one (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from engine.request import Request
from protocol.messages import FinishReason

NULL_BLOCK_ID = 0
# Partial-block records kept per parent block (most recent first out): enough for the few requests that
# end at the same place, bounded so that a lookup scans a handful.
MAX_TAILS_PER_PARENT = 8


@dataclass(frozen=True)
class CachedTail:
    """A block whose first num_tokens tokens continue a request's cached prefix."""

    block_id: int
    num_tokens: int


@dataclass(frozen=True)
class BlockCopy:
    """Before the step: copy the KV of the first num_slots slots of block src into block dst."""

    src: int
    dst: int
    num_slots: int


def hash_block(parent_hash: bytes | None, token_ids: list[int], extra_keys: tuple[str, ...]) -> bytes:
    """Chained hash of one full block: the parent's hash, the block's tokens and any extra keys."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"root")
    h.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        h.update(b"\x00" + key.encode())
    return h.digest()


class BlockPool:
    """Free blocks in LRU order; a freed block keeps its hash (and stays findable) until it is reused."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[bytes, int] = {}
        # Where requests' tokens ended: parent key -> {block id: the block's valid tokens}, and back.
        self.tails: dict[bytes, OrderedDict[int, tuple[int, ...]]] = {}
        self.tail_keys: dict[int, bytes] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        usable = self.num_blocks - 1
        return (usable - len(self.free_blocks)) / usable

    def allocate(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)  # least recently freed first
        self.drop_tail(block_id)  # its contents are about to change
        old_hash = self.block_hashes[block_id]
        if old_hash is not None:
            del self.cached[old_hash]
            self.block_hashes[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def touch(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_blocks[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_blocks[block_id] = None

    def set_hash(self, block_id: int, block_hash: bytes) -> None:
        if block_hash in self.cached or self.block_hashes[block_id] is not None:
            return  # an identical block is cached already; this copy stays private
        self.block_hashes[block_id] = block_hash
        self.cached[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        for block_id, block_hash in enumerate(self.block_hashes):
            if block_hash is not None and self.ref_counts[block_id] == 0:
                self.block_hashes[block_id] = None
                del self.cached[block_hash]
        self.tails.clear()
        self.tail_keys.clear()

    def add_tail(self, key: bytes, block_id: int, tokens: tuple[int, ...]) -> None:
        """Records that block_id holds the KV of `tokens` following the prefix `key` names."""
        self.drop_tail(block_id)
        group = self.tails.setdefault(key, OrderedDict())
        group[block_id] = tokens
        self.tail_keys[block_id] = key
        if len(group) > MAX_TAILS_PER_PARENT:
            oldest, _ = group.popitem(last=False)
            del self.tail_keys[oldest]

    def drop_tail(self, block_id: int) -> None:
        key = self.tail_keys.pop(block_id, None)
        if key is not None:
            group = self.tails[key]
            del group[block_id]
            if not group:
                del self.tails[key]

    def longest_tail(self, key: bytes, tokens: list[int]) -> CachedTail | None:
        """The recorded block after `key` that shares the most leading tokens with `tokens`, if any does."""
        best: CachedTail | None = None
        for block_id, recorded in self.tails.get(key, {}).items():
            matched = 0
            for a, b in zip(recorded, tokens, strict=False):
                if a != b:
                    break
                matched += 1
            if matched and (best is None or matched > best.num_tokens):
                best = CachedTail(block_id, matched)
        return best


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        reuse_partial_blocks: bool = True,
    ) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Partial-block reuse needs the runner to copy KV slots (BlockCopy): off where it cannot.
        self.reuse_partial_blocks = enable_prefix_caching and reuse_partial_blocks
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hash(self, request: Request, index: int) -> bytes:
        start = index * self.block_size
        end = start + self.block_size
        parent = request.block_hashes[index - 1] if index > 0 else None
        tokens = [request.token_id_at(p) for p in range(start, end)]
        extra = request.embed_key_for(start, end)
        if index == 0:
            extra = (*_root_keys(request), *extra)
        return hash_block(parent, tokens, extra)

    def _tail_key(self, request: Request, index: int) -> bytes:
        """What precedes block `index` of the request: the previous block's hash, or the chain's root keys."""
        if index > 0:
            return request.block_hashes[index - 1]
        return hash_block(None, [], _root_keys(request))

    def _reads_cache(self, request: Request) -> bool:
        # Prompt logprobs need the logits of every prompt position, so such a request reads no cache.
        return self.enable_prefix_caching and request.sampling.prompt_logprobs is None

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached block ids for the longest cached prefix, leaving the last prompt token to compute.

        Counts nothing: an admission that finds no free blocks is retried every step, so the caller
        reports the lookup with record_prefix_lookup() once the request is actually admitted.
        """
        if not self._reads_cache(request):
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks)
        hits: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def find_cached_tail(self, request: Request, num_hit_blocks: int) -> CachedTail | None:
        """A block holding the tokens that follow the request's cached whole blocks, up to the last prompt
        token (which is always computed), where an earlier request's tokens ended; None if none does."""
        if not self.reuse_partial_blocks or not self._reads_cache(request):
            return None
        start = num_hit_blocks * self.block_size
        limit = min(self.block_size, request.num_tokens - 1 - start)
        if limit <= 0 or request.embed_key_for(start, start + self.block_size):
            return None  # nothing left to reuse, or embeddings that the tokens do not name
        tokens = [request.token_id_at(p) for p in range(start, start + limit)]
        return self.pool.longest_tail(self._tail_key(request, num_hit_blocks), tokens)

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Prefix-cache hit-rate counters: called once per admission of a request into the running set."""
        if self._reads_cache(request):
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += num_hit_tokens

    def _extend_hashes(self, request: Request, num_full_blocks: int) -> None:
        while len(request.block_hashes) < num_full_blocks:
            request.block_hashes.append(self._block_hash(request, len(request.block_hashes)))

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        cached_block_ids: list[int] | None = None,
        tail: CachedTail | None = None,
    ) -> bool:
        """Give the request blocks for num_new_tokens more tokens (after any cached prefix). False if out of
        blocks. With a cached `tail` (find_cached_tail, at admission) its tokens count as computed and its
        block stays pinned until release_copy_source(): the caller plans the copy into the request's block
        after the cached ones."""
        cached_block_ids = cached_block_ids or []
        num_owned = len(request.block_ids) + len(cached_block_ids)
        num_computed = request.num_computed_tokens + len(cached_block_ids) * self.block_size
        num_computed += tail.num_tokens if tail is not None else 0
        num_needed = self.blocks_needed(num_computed + num_new_tokens) - num_owned
        # Cached blocks that sit in the free list are taken out of it by touch(); count them as used.
        pinned = [*cached_block_ids, *([tail.block_id] if tail is not None else [])]
        num_reclaimed = sum(1 for b in pinned if self.pool.ref_counts[b] == 0)
        if num_needed > self.pool.num_free_blocks - num_reclaimed:
            return False
        for block_id in pinned:
            self.pool.touch(block_id)
        request.block_ids.extend(cached_block_ids)
        request.num_registered_blocks += len(cached_block_ids)
        request.block_ids.extend(self.pool.allocate() for _ in range(max(num_needed, 0)))
        return True

    def release_copy_source(self, copy: BlockCopy) -> None:
        """Unpins a BlockCopy's source once the step that copies it has run."""
        self.pool.release(copy.src)

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        self._extend_hashes(request, num_full)
        for index in range(request.num_registered_blocks, num_full):
            self.pool.set_hash(request.block_ids[index], request.block_hashes[index])
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)

    def free(self, request: Request) -> None:
        self._record_tails(request)
        # Tail blocks first, so they are evicted before the shared prefix blocks.
        for block_id in reversed(request.block_ids):
            self.pool.release(block_id)
        request.block_ids = []
        request.num_registered_blocks = 0

    def _record_tails(self, request: Request) -> None:
        """Where the request's tokens end, for find_cached_tail: the block holding its last computed tokens,
        and the block where its prompt ends (the same prompt again matches that block's first tokens)."""
        size, num_computed = self.block_size, request.num_computed_tokens
        if not self.reuse_partial_blocks or not request.block_ids or num_computed <= 0:
            return
        if request.finish_reason is FinishReason.ERROR:
            return  # its last step failed, maybe before its own copies ran: trust none of its tail
        num_full = min(num_computed // size, len(request.block_ids))
        self._extend_hashes(request, num_full)
        ends = {num_computed // size, (min(request.num_prompt_tokens, num_computed) - 1) // size}
        for index in sorted(ends):
            start = index * size
            end = min(start + size, num_computed)
            if index >= len(request.block_ids) or end <= start or request.embed_key_for(start, start + size):
                continue
            tokens = tuple(request.token_id_at(p) for p in range(start, end))
            self.pool.add_tail(self._tail_key(request, index), request.block_ids[index], tokens)


def _root_keys(request: Request) -> tuple[str, ...]:
    """Keys of a hash chain's first block: KV computed under a cache salt or an adapter's weights is theirs
    alone (the chain carries it on)."""
    keys: tuple[str, ...] = ()
    if request.cache_salt:
        keys = (f"salt:{request.cache_salt}",)
    lora_key = request.lora_key
    if lora_key is not None:
        keys = (lora_key, *keys)
    return keys
