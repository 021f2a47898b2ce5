"""Per-request block bookkeeping on top of the BlockPool: prefix hits, slot growth, caching."""

from __future__ import annotations

from engine.block_pool import BlockPool, KVCacheBlock, hash_block
from engine.request import Request


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.prefix_queries = 0  # prompt tokens looked up on first admission (vLLM's metric)
        self.prefix_hits = 0  # ... of which the prefix cache served

    def count_lookup(self, num_prompt_tokens: int, num_hit_blocks: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix_hits(self, request: Request) -> list[KVCacheBlock]:
        """Leading cached blocks of the request's tokens. Pure lookup: modifies nothing.

        At least one token is always left to compute (its logits give the next token), so a
        prompt that is entirely cached still recomputes its last block.
        """
        if not self.pool.enable_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        parent = None
        for i in range(max_blocks):
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, tokens)
            block = self.pool.lookup(parent, tokens)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(
        self, request: Request, num_new_tokens: int, hits: list[KVCacheBlock] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more computed tokens; False (nothing changed) if short."""
        hits = hits or []
        have = len(request.block_ids) + len(hits)
        covered = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        need = max(0, self.blocks_needed(covered) - have)
        # Hits that sit in the free queue stop being allocatable once touched.
        revived = sum(1 for b in hits if b.ref_cnt == 0)
        if not self.pool.can_allocate(need + revived):
            return False
        if hits:
            self.pool.touch(hits)
            request.block_ids.extend(b.block_id for b in hits)
            request.num_computed_tokens += len(hits) * self.block_size
        request.block_ids.extend(b.block_id for b in self.pool.allocate(need))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Hash every full block whose tokens are all computed."""
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        parent = request.block_hashes[-1] if request.block_hashes else None
        for i in range(len(request.block_hashes), num_full):
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, tokens)
            request.block_hashes.append(parent)
            self.pool.cache(self.pool.blocks[request.block_ids[i]], parent, tokens)

    def trim(self, request: Request) -> None:
        """Roll back blocks past the request's tokens (taken for proposals it did not keep).

        They hold no hashed content: only full blocks of computed tokens are ever cached, and
        these start after the request's last token.
        """
        keep = self.blocks_needed(request.num_tokens)
        extra = request.block_ids[keep:]
        if extra:
            self.pool.free([self.pool.blocks[i] for i in reversed(extra)])
            # A new list, as free() does: input batches then rewrite the row instead of
            # trusting the ids they copied (a shrink then regrowth would look unchanged).
            request.block_ids = request.block_ids[:keep]

    def free(self, request: Request) -> None:
        self.pool.free([self.pool.blocks[i] for i in reversed(request.block_ids)])
        request.block_ids = []
        request.block_hashes = []
