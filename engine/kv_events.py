"""KV events: which block hashes a worker's prefix cache gained and lost, in order.

The block pool reports every hash it registers (`stored`), every hash it forgets (`removed`, on
eviction) and a reset (`cleared`); this log numbers them 1, 2, 3, ... and keeps the most recent
`capacity` of them, together with the set of hashes cached now. A reader (the gateway's prefix
index, through the worker's GetKVEvents) asks for everything after the last number it applied:
it gets the events it missed, or a full snapshot when they have been dropped from the log.
Because every event says the state of one hash (present or not), applying one twice changes
nothing, and a reader that sees a gap rebuilds from the snapshot instead of guessing.

Thread-safe: the engine thread writes, the gRPC thread reads. Hashes are
`contract.block_hash` values (pdserve-block-hash-v1), so the gateway computes the same ones.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class KVEventKind(Enum):
    STORED = "stored"
    REMOVED = "removed"
    CLEARED = "cleared"  # every hash forgotten (reset_prefix_cache); carries no hashes


@dataclass(frozen=True, slots=True)
class KVEvent:
    seq: int  # 1, 2, 3, ... per worker start
    kind: KVEventKind
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KVEventsRead:
    """What a reader gets: the events after its number, or (`snapshot` set) every hash now."""

    last_seq: int  # the number of the newest event this read accounts for
    events: tuple[KVEvent, ...] = ()
    snapshot: frozenset[int] | None = None  # set: replace everything known with this


class KVEventLog:
    def __init__(self, capacity: int = 8192) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._lock = threading.Lock()
        self._events: deque[KVEvent] = deque(maxlen=capacity)
        self._cached: set[int] = set()
        self._seq = 0

    def stored(self, block_hashes: Iterable[int]) -> None:
        self._append(KVEventKind.STORED, tuple(block_hashes))

    def removed(self, block_hashes: Iterable[int]) -> None:
        self._append(KVEventKind.REMOVED, tuple(block_hashes))

    def cleared(self) -> None:
        self._append(KVEventKind.CLEARED, ())

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def read(self, after_seq: int | None, max_events: int = 4096) -> KVEventsRead:
        """Events numbered after `after_seq`, or a snapshot when `after_seq` is None, ahead of
        this log (another worker start), or older than what the log still holds."""
        with self._lock:
            oldest = self._events[0].seq if self._events else self._seq + 1
            if after_seq is None or after_seq > self._seq or after_seq < oldest - 1:
                return KVEventsRead(self._seq, snapshot=frozenset(self._cached))
            start = len(self._events) - (self._seq - after_seq)
            events = tuple(self._events[i] for i in range(start, len(self._events)))
        events = events[:max_events]
        return KVEventsRead(events[-1].seq if events else after_seq, events)

    def _append(self, kind: KVEventKind, block_hashes: tuple[int, ...]) -> None:
        if kind != KVEventKind.CLEARED and not block_hashes:
            return
        with self._lock:
            if kind == KVEventKind.STORED:
                self._cached.update(block_hashes)
            elif kind == KVEventKind.REMOVED:
                self._cached.difference_update(block_hashes)
            else:
                self._cached.clear()
            self._seq += 1
            self._events.append(KVEvent(self._seq, kind, block_hashes))
