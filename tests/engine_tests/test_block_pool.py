"""BlockPool and KVCacheManager bookkeeping, no model."""

import pytest

from engine.block_pool import BlockPool, hash_block
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_request(rid, tokens):
    return Request(rid, list(tokens), SamplingParams())


def test_allocate_free_roundtrip_and_integrity():
    pool = BlockPool(8)
    blocks = pool.allocate(5)
    assert pool.num_free_blocks == 3
    pool.check_integrity()
    pool.free(blocks)
    assert pool.num_free_blocks == 8
    pool.check_integrity()
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(blocks[:1])
    with pytest.raises(RuntimeError):
        pool.allocate(9)


def test_prefix_hit_requires_same_tokens_and_chain():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, block_size=4)
    a = make_request("a", range(10))
    assert kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    assert len(a.block_hashes) == 2  # only full blocks are hashed
    b = make_request("b", list(range(8)) + [50, 51, 52])
    hits = kv.find_prefix_hits(b)
    assert [h.block_id for h in hits] == a.block_ids[:2]
    c = make_request("c", [0, 1, 2, 99] + list(range(4, 10)))  # first block differs -> chain breaks
    assert kv.find_prefix_hits(c) == []
    pool.check_integrity()


def test_fully_cached_prompt_still_computes_last_block():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, block_size=4)
    a = make_request("a", range(8))
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    b = make_request("b", range(8))
    assert len(kv.find_prefix_hits(b)) == 1


def test_freed_cached_blocks_are_reused_lru_and_evicted_last():
    pool = BlockPool(5)
    kv = KVCacheManager(pool, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    kv.allocate(a, 4)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    kv.free(a)
    pool.check_integrity()
    # Plain free blocks go first; the cached ones survive a small allocation.
    fresh = pool.allocate(2)
    assert all(b.block_hash is None for b in fresh)
    b = make_request("b", [1, 2, 3, 4, 5])
    hits = kv.find_prefix_hits(b)
    assert len(hits) == 2
    assert kv.allocate(b, 1, hits)  # revives both cached blocks, no free block left
    assert b.num_computed_tokens == 4
    assert pool.num_free_blocks == 0
    pool.check_integrity()


def test_allocate_refuses_without_side_effects_when_short():
    pool = BlockPool(2)
    kv = KVCacheManager(pool, block_size=4)
    r = make_request("r", range(12))
    assert not kv.allocate(r, 12)
    assert r.block_ids == [] and pool.num_free_blocks == 2


def test_shared_block_needs_both_frees():
    pool = BlockPool(4)
    kv = KVCacheManager(pool, block_size=2)
    a = make_request("a", [1, 2, 3])
    kv.allocate(a, 3)
    a.num_computed_tokens = 3
    kv.cache_full_blocks(a)
    b = make_request("b", [1, 2, 9])
    hits = kv.find_prefix_hits(b)
    kv.allocate(b, 1, hits)
    shared = pool.blocks[a.block_ids[0]]
    assert shared.ref_cnt == 2
    kv.free(a)
    assert shared.ref_cnt == 1 and pool.num_free_blocks == 2
    kv.free(b)
    assert pool.num_free_blocks == 4
    pool.check_integrity()


def test_hash_is_chained():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
