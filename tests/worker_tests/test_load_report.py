"""The load report counts each request once (it used to say queue_depth 2 for one request)."""

from __future__ import annotations

from engine.engine import EngineStats
from kvtransfer.exporter import WorkerIdentity
from worker import wire
from worker.snapshot import WorkerSnapshot


def stats(running: int, waiting: int) -> EngineStats:
    return EngineStats(running, waiting, 0, 0, 90, 100, 0.1, 0, prefix_cache_queries=64,
                       prefix_cache_hits=48)  # fmt: skip


def test_a_request_on_the_engine_and_in_a_stream_is_one_request():
    identity = WorkerIdentity("d0", 1, "host")
    one = wire.load_report(WorkerSnapshot(stats(1, 0), 1, 0, block_size=16), identity, "decode", True)  # fmt: skip
    assert one.queue_depth == 1
    # Imports still pulling KV hold a stream but are not in the engine's queues yet.
    pulling = wire.load_report(WorkerSnapshot(stats(1, 1), 4, 2), identity, "decode", True)
    assert pulling.queue_depth == 4
    idle = wire.load_report(WorkerSnapshot(stats(0, 0), 0, 0), identity, "decode", True)
    assert idle.queue_depth == 0
    assert (one.block_size, one.prefix_cache_queries, one.prefix_cache_hits) == (16, 64, 48)
