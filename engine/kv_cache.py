"""Paged KV-cache bookkeeping: a reference-counted block pool with prefix caching by chained block hashes.

Pure Python, no torch: the tensors live in the model runner; this module only decides which block ids
each request owns. Block 0 is the null block (never handed out): padded slots may write there.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.request import Request

NULL_BLOCK_ID = 0


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

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        usable = self.num_blocks - 1
        return (usable - len(self.free_blocks)) / usable

    def allocate(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)  # least recently freed first
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


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
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
        if index == 0 and request.cache_salt:
            extra = (f"salt:{request.cache_salt}", *extra)
        lora_key = request.lora_key
        if index == 0 and lora_key is not None:
            # KV computed under an adapter's weights is that adapter's alone (the chain carries it on).
            extra = (lora_key, *extra)
        return hash_block(parent, tokens, extra)

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

    def record_prefix_lookup(self, request: Request, num_hit_blocks: int) -> None:
        """Prefix-cache hit-rate counters: called once per admission of a request into the running set."""
        if self._reads_cache(request):
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += num_hit_blocks * self.block_size

    def _extend_hashes(self, request: Request, num_full_blocks: int) -> None:
        while len(request.block_hashes) < num_full_blocks:
            request.block_hashes.append(self._block_hash(request, len(request.block_hashes)))

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_block_ids: list[int] | None = None
    ) -> bool:
        """Give the request blocks for num_new_tokens more tokens (after any cached prefix). False if out of blocks."""
        cached_block_ids = cached_block_ids or []
        num_owned = len(request.block_ids) + len(cached_block_ids)
        num_computed = request.num_computed_tokens + len(cached_block_ids) * self.block_size
        num_needed = self.blocks_needed(num_computed + num_new_tokens) - num_owned
        # Cached blocks that sit in the free list are taken out of it by touch(); count them as used.
        num_reclaimed = sum(1 for b in cached_block_ids if self.pool.ref_counts[b] == 0)
        if num_needed > self.pool.num_free_blocks - num_reclaimed:
            return False
        for block_id in cached_block_ids:
            self.pool.touch(block_id)
        request.block_ids.extend(cached_block_ids)
        request.num_registered_blocks += len(cached_block_ids)
        request.block_ids.extend(self.pool.allocate() for _ in range(max(num_needed, 0)))
        return True

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
        # Tail blocks first, so they are evicted before the shared prefix blocks.
        for block_id in reversed(request.block_ids):
            self.pool.release(block_id)
        request.block_ids = []
        request.num_registered_blocks = 0
