"""KV events: the block pool reports what its prefix cache gains and loses, in order."""

from __future__ import annotations

import random

import pytest

from engine.block_pool import BlockPool
from engine.kv_events import KVEventKind, KVEventLog


def replay(read, known: set[int]) -> set[int]:
    if read.snapshot is not None:
        return set(read.snapshot)
    for event in read.events:
        if event.kind == KVEventKind.STORED:
            known |= set(event.block_hashes)
        elif event.kind == KVEventKind.REMOVED:
            known -= set(event.block_hashes)
        else:
            known.clear()
    return known


def churn(pool: BlockPool, rng: random.Random, steps: int) -> None:
    """Allocate, cache, free and evict at random: every path that adds or drops a hash."""
    owned = []
    for _ in range(steps):
        op = rng.random()
        if op < 0.5 and pool.can_allocate(2):
            blocks = pool.allocate(2)
            for b in blocks:
                tokens = [rng.randrange(50) for _ in range(4)]
                pool.cache(b, rng.randrange(40), tokens)  # small hash space: duplicates too
            owned.append(blocks)
        elif op < 0.95 and owned:
            pool.free(list(reversed(owned.pop(rng.randrange(len(owned))))))
        else:
            pool.reset_prefix_cache()


def test_events_from_any_point_rebuild_exactly_what_the_pool_caches():
    rng = random.Random(7)
    log = KVEventLog(capacity=100_000)
    pool = BlockPool(12, events=log)
    history = [(0, set())]
    for _ in range(60):
        churn(pool, rng, 10)
        history.append((log.last_seq, set(pool.cached_hashes())))
        pool.check_integrity()
    assert log.read(None).snapshot == frozenset(pool.cached_hashes())
    for seq, state in history:  # a reader that stopped at `seq` catches up to now
        assert replay(log.read(seq, max_events=10**9), set(state)) == set(pool.cached_hashes())


def test_a_reader_behind_the_log_or_from_another_start_gets_a_snapshot():
    log = KVEventLog(capacity=3)
    for h in range(5):
        log.stored([h])
    assert log.last_seq == 5
    assert log.read(1).snapshot == frozenset(range(5))  # events 2 .. 5 no longer all kept
    caught_up = log.read(2)
    assert caught_up.snapshot is None
    assert [e.seq for e in caught_up.events] == [3, 4, 5]
    assert log.read(9).snapshot == frozenset(range(5))  # ahead: another worker start
    assert log.read(5).events == () and log.read(5).last_seq == 5
    limited = log.read(2, max_events=2)
    assert [e.seq for e in limited.events] == [3, 4] and limited.last_seq == 4


def test_removal_and_reset_are_events_too():
    log = KVEventLog()
    pool = BlockPool(2, events=log)
    (a,) = pool.allocate(1)
    pool.cache(a, 11, [1, 2])
    pool.free([a])
    pool.allocate(2)  # evicts the cached free block
    assert [(e.kind, e.block_hashes) for e in log.read(0).events] == [
        (KVEventKind.STORED, (11,)),
        (KVEventKind.REMOVED, (11,)),
    ]
    pool.reset_prefix_cache()
    assert log.read(2).events[0].kind == KVEventKind.CLEARED


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        KVEventLog(capacity=0)
