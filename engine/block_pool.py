"""The pool of KV blocks: ref counts, a free queue with LRU reuse, and the prefix cache.

Invariants (checked by `check_integrity`):
- a block is in the free queue  <=>  its ref_cnt == 0;
- a block with a hash is in the cache map under that hash, and the map holds nothing else;
- free blocks without a hash sit ahead of cached free blocks' eviction order is LRU: a cached
  block freed last is evicted last.
Only full blocks are ever hashed; a hit is confirmed by comparing token ids, not just hashes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from contract.block_hash import hash_block
from engine.kv_events import KVEventLog

__all__ = ["BlockPool", "KVCacheBlock", "hash_block"]  # hash_block: the chained content hash


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # the tokens a hashed block holds (hit check)


class BlockPool:
    def __init__(
        self, num_blocks: int, enable_caching: bool = True, events: KVEventLog | None = None
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Front of the queue is evicted first.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self._cached: dict[int, KVCacheBlock] = {}
        self.events = events  # told of every hash registered and forgotten (KV events)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> KVCacheBlock | None:
        """A cached block holding exactly these tokens, or None. Does not modify the pool."""
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Take a reference on cache hits (reviving free ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[KVCacheBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Drop one reference each; pass blocks tail-first so a sequence's tail is evicted first."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)  # reuse plain blocks first

    def cache(self, block: KVCacheBlock, block_hash: int, token_ids: Sequence[int]) -> None:
        """Register a full, computed block under its hash (first writer wins on duplicates)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block
        if self.events is not None:
            self.events.stored((block_hash,))

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()
        if self.events is not None:
            self.events.cleared()

    def cached_hashes(self) -> list[int]:
        """Every hash the prefix cache holds now (what a KV-event snapshot must equal)."""
        return list(self._cached)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            if self.events is not None:
                self.events.removed((block.block_hash,))
            block.block_hash = None
            block.token_ids = None

    def check_integrity(self) -> None:
        for block in self.blocks:
            in_free = block.block_id in self._free
            if in_free != (block.ref_cnt == 0):
                raise AssertionError(
                    f"block {block.block_id}: ref_cnt {block.ref_cnt}, in free queue {in_free}"
                )
            if block.ref_cnt < 0:
                raise AssertionError(f"block {block.block_id}: negative ref_cnt")
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise AssertionError(f"block {block.block_id}: hash not mapped to it")
        if len({id(b) for b in self._cached.values()}) != len(self._cached):
            raise AssertionError("a block is cached under two hashes")
        for h, block in self._cached.items():
            if block.block_hash != h:
                raise AssertionError(
                    f"cache entry {h} points at block {block.block_id} with another hash"
                )
