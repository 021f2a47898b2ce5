"""The prefix index, the routing policies and pool membership, without workers."""

from __future__ import annotations

import asyncio
import random

import pytest

from contract.block_hash import hash_blocks
from gateway.discovery import Discovery, parse_entries
from gateway.prefix_index import PrefixIndex
from gateway.router import Route, make_router
from gateway.worker_client import KVEventBatch, KVEventsUpdate, LoadSnapshot
from gateway.worker_pool import DECODE, PREFILL, Worker, WorkerPool

BS = 4


def snapshot(hashes, seq=0, epoch=1, engine="p0") -> KVEventsUpdate:
    return KVEventsUpdate(engine, epoch, BS, seq, (), frozenset(hashes))


def events(*batches, epoch=1, engine="p0") -> KVEventsUpdate:
    evs = tuple(KVEventBatch(seq, kind, tuple(h)) for seq, kind, h in batches)
    return KVEventsUpdate(engine, epoch, BS, evs[-1].seq if evs else 0, evs, None)


def test_events_apply_in_order_replays_are_skipped_and_a_gap_forces_a_snapshot():
    index = PrefixIndex()
    assert index.cursor("a") is None
    index.apply("a", snapshot({1, 2}, seq=3))
    index.apply("a", events((4, "stored", [5]), (5, "removed", [1])))
    assert index.hashes("a") == {2, 5} and index.cursor("a") == (1, 5)
    index.apply("a", events((4, "stored", [1]), (5, "removed", [5])))  # replayed: no effect
    assert index.hashes("a") == {2, 5}
    index.apply("a", events((7, "stored", [9])))  # event 6 was lost
    assert index.cursor("a") is None and index.hashes("a") == frozenset()
    index.apply("a", snapshot({2, 9}, seq=7))
    assert index.hashes("a") == {2, 9}
    index.apply("a", events((8, "cleared", []), epoch=2))  # restarted worker: wait for snapshot
    assert index.cursor("a") is None


def test_lost_duplicated_and_reordered_answers_never_leave_a_wrong_index():
    """Whatever reaches the index, what it holds for a worker is exactly the worker's cache as
    of the last event it claims to have applied, or nothing."""
    rng = random.Random(3)
    truth = [set()]  # truth[seq]: the worker's hashes after event seq
    log: list[KVEventBatch] = []
    for seq in range(1, 400):
        kind = rng.choice(["stored", "stored", "removed", "cleared"] if seq % 50 else ["cleared"])
        hashes = tuple(rng.sample(range(30), 3)) if kind != "cleared" else ()
        state = set(truth[-1])
        if kind == "stored":
            state.update(hashes)
        elif kind == "removed":
            state.difference_update(hashes)
        else:
            state.clear()
        truth.append(state)
        log.append(KVEventBatch(seq, kind, hashes))
    index = PrefixIndex()
    sent = []
    checked = 0
    for step in range(600):
        cursor = index.cursor("w")
        seq_now = min(len(log), step)
        if cursor is None:
            answer = snapshot(truth[seq_now], seq=seq_now)
        else:
            answer = events(*[(e.seq, e.kind, e.hashes) for e in log[cursor[1] : seq_now]])
        sent.append(answer)
        fate = rng.random()
        if fate < 0.2:
            continue  # lost
        if fate < 0.4 and len(sent) > 3:
            answer = rng.choice(sent[-4:])  # an old one arrives (again) instead
        if answer.events or answer.snapshot is not None:
            index.apply("w", answer)
        cursor = index.cursor("w")
        if cursor is not None:
            assert index.hashes("w") == truth[cursor[1]]
            checked += 1
    assert checked > 300 and index.cursor("w") is not None


def test_matched_blocks_counts_leading_blocks_and_recent_routing_notes_expire():
    now = [0.0]
    index = PrefixIndex(recent_ttl_s=1.0, clock=lambda: now[0])
    prompt = hash_blocks(list(range(16)), BS)  # 4 blocks
    index.apply("a", snapshot({prompt[0], prompt[1], prompt[3]}))
    assert index.matched_blocks("a", prompt) == 2  # block 3 does not count after a miss
    index.note_routed("b", prompt[:3])
    assert index.matched_blocks("b", prompt) == 3
    now[0] = 50.0  # a long prefill: still running, still noted
    assert index.matched_blocks("b", prompt) == 3
    index.note_done("b", prompt[:3])
    now[0] = 50.5
    assert index.matched_blocks("b", prompt) == 3
    now[0] = 52.0
    assert index.matched_blocks("b", prompt) == 0
    index.prune()
    index.forget("a")
    assert index.matched_blocks("a", prompt) == 0


class FakeClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def worker(address, role=PREFILL, depth=0, free_blocks=100) -> Worker:
    w = Worker(address, role, FakeClient(address), healthy=True)  # type: ignore[arg-type]
    w.load = LoadSnapshot("e", 1, role, 0, 0, depth, 0.0, free_blocks, 100, 0, True, block_size=BS)
    return w


def test_kv_aware_prefill_prefers_the_cached_prefix_until_load_outweighs_it():
    index = PrefixIndex(recent_ttl_s=0.0)  # only what events confirm once a prefill ends
    router = make_router("kv-aware", index)
    a, b = worker("a:1"), worker("b:1")
    tokens = list(range(40))  # 10 blocks
    index.apply("b:1", snapshot(hash_blocks(tokens, BS)[:8]))
    route = Route(tokens + [99])

    def choose():
        choice = router.choose(PREFILL, [a, b], route)
        index.note_done(choice.worker.address, choice.noted_hashes)
        return choice

    choice = choose()
    assert choice.worker is b and choice.prefill_tokens == 41 - 32
    b.pending_prefill_tokens = 40  # b busy with 40 tokens of work: a computes 41 sooner
    assert choose().worker is a
    b.pending_prefill_tokens = 0
    a.foreign_load = 1  # another gateway's request queued on a: b (9 tokens to go) is sooner
    assert choose().worker is b
    b.foreign_load = 1
    assert choose().worker is b


def test_a_running_prefill_draws_the_same_prefix_to_its_worker():
    index = PrefixIndex()
    router = make_router("kv-aware", index)
    a, b = worker("a:1"), worker("b:1")
    route = Route(list(range(40)))
    first = router.choose(PREFILL, [a, b], route)
    first.worker.pending_prefill_tokens = 10  # busy, but with the prefix on its way
    assert router.choose(PREFILL, [a, b], route).worker is first.worker


def test_decode_goes_to_the_least_loaded_worker_with_room():
    router = make_router("kv-aware", PrefixIndex())
    idle_but_full = worker("a:1", DECODE, depth=0, free_blocks=2)
    busy = worker("b:1", DECODE, depth=3, free_blocks=50)
    assert router.choose(DECODE, [idle_but_full, busy], Route(list(range(20)), 20)).worker is busy
    assert router.choose(DECODE, [idle_but_full, busy], Route([1], 1)).worker is idle_but_full


def test_round_robin_takes_turns_and_least_loaded_follows_depth():
    rr = make_router("round-robin", PrefixIndex())
    a, b = worker("a:1"), worker("b:1", depth=5)
    assert [rr.choose(PREFILL, [b, a], Route([1])).worker for _ in range(3)] == [a, b, a]
    assert (
        make_router("least-loaded", PrefixIndex()).choose(PREFILL, [b, a], Route([1])).worker is a
    )
    with pytest.raises(ValueError, match="unknown router"):
        make_router("random", PrefixIndex())


def test_dns_entries_follow_the_name_and_a_failed_lookup_keeps_the_last_answer():
    answers = {"svc": ["10.0.0.1", "10.0.0.2"]}

    async def resolver(host, port):
        if host not in answers:
            raise OSError("no such name")
        return answers[host]

    pool = WorkerPool(["dns:svc:50061", "10.9.9.9:1"], ["d:2"], 1.0, FakeClient, resolver=resolver)

    def prefill_addresses():
        return sorted(w.address for w in pool.of_role(PREFILL))

    assert prefill_addresses() == ["10.9.9.9:1"]  # before the first refresh: the static ones
    asyncio.run(pool.refresh_members())
    assert prefill_addresses() == ["10.0.0.1:50061", "10.0.0.2:50061", "10.9.9.9:1"]
    gone = next(w for w in pool.workers if w.address == "10.0.0.2:50061")
    pool.index.apply(gone.address, snapshot({1}))
    gone.in_flight = 1
    answers["svc"] = ["10.0.0.1", "10.0.0.3"]
    asyncio.run(pool.refresh_members())
    assert prefill_addresses() == ["10.0.0.1:50061", "10.0.0.3:50061", "10.9.9.9:1"]
    assert pool.index.hashes(gone.address) == frozenset()
    asyncio.run(pool._close_retired())
    assert not gone.client.closed  # a request still runs on it
    gone.in_flight = 0
    asyncio.run(pool._close_retired())
    assert gone.client.closed
    del answers["svc"]
    asyncio.run(pool.refresh_members())
    assert len(prefill_addresses()) == 3


def test_a_failed_worker_is_skipped_and_forgotten_by_the_index():
    pool = WorkerPool(["a:1", "b:1"], ["d:1"], 1.0, FakeClient)
    for w in pool.workers:
        w.healthy = True
    a = pool.of_role(PREFILL)[0]
    pool.index.apply(a.address, snapshot({1}))
    pool.mark_failed(a, "UNAVAILABLE")
    assert pool.index.hashes(a.address) == frozenset()
    choice = pool.pick_prefill(Route(list(range(8))))
    assert choice is not None and choice.worker.address == "b:1"
    assert choice.worker.pending_prefill_tokens == 8
    pool.prefill_done(choice)
    assert choice.worker.pending_prefill_tokens == 0
    assert pool.pick_prefill(Route([1]), exclude=[choice.worker]) is None


def test_parse_entries():
    (e,) = parse_entries(["dns:pdserve-prefill.ns.svc:50061"], "--prefill")
    assert (e.host, e.port, e.dns) == ("pdserve-prefill.ns.svc", 50061, True)
    assert Discovery([e]).has_dns
    with pytest.raises(ValueError, match="twice"):
        parse_entries(["h:1", "h:1"], "--prefill")
