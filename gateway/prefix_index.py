"""Which worker holds which prefix: the gateway's index of the workers' KV events.

Per worker it keeps the set of block hashes (pdserve-block-hash-v1) its prefix cache holds,
built from GetKVEvents answers. Rules that keep it from ever being corrupted:
- a snapshot replaces everything known about the worker;
- events apply only in order: one numbered at or below the last applied is a replay and is
  skipped (applying it again would change nothing anyway: each event states whether a hash is
  cached), one that skips a number is a gap and drops the worker's entry, so the next poll asks
  for a snapshot instead of guessing what was lost;
- events of another engine id or epoch (the worker restarted) are ignored: a snapshot follows;
- a worker that fails or leaves is forgotten.

Besides what events confirm, a prefill routed to a worker counts as "probably cached there"
while it runs and for `recent_ttl_s` after it ends (time for its events to arrive), so a burst of
one new prefix lands on the worker already computing it. These notes sit apart from the
confirmed sets and expire on their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gateway.worker_client import KVEventsUpdate


@dataclass(slots=True)
class _WorkerBlocks:
    engine_id: str
    epoch: int
    block_size: int
    last_seq: int
    hashes: set[int] = field(default_factory=set)


class PrefixIndex:
    def __init__(
        self, recent_ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._workers: dict[str, _WorkerBlocks] = {}
        self._recent: dict[str, dict[int, float]] = {}  # key -> hash -> expiry
        self._recent_ttl_s = recent_ttl_s
        self._clock = clock

    # -- keeping it up to date ------------------------------------------------------------------

    def cursor(self, key: str) -> tuple[int, int] | None:
        """(epoch, last applied seq) to ask the worker for; None: ask for a snapshot."""
        state = self._workers.get(key)
        return None if state is None else (state.epoch, state.last_seq)

    def apply(self, key: str, update: KVEventsUpdate) -> None:
        if update.snapshot is not None:
            self._workers[key] = _WorkerBlocks(
                update.engine_id,
                update.epoch,
                update.block_size,
                update.last_seq,
                set(update.snapshot),
            )
            return
        state = self._workers.get(key)
        if state is None or (state.engine_id, state.epoch) != (update.engine_id, update.epoch):
            self._workers.pop(key, None)  # a restarted worker: wait for its snapshot
            return
        for event in update.events:
            if event.seq <= state.last_seq:
                continue  # replayed
            if event.seq != state.last_seq + 1:
                del self._workers[key]  # lost events: rebuild from the next snapshot
                return
            _apply_event(state.hashes, event.kind, event.hashes)
            state.last_seq = event.seq

    def forget(self, key: str) -> None:
        self._workers.pop(key, None)
        self._recent.pop(key, None)

    def note_routed(self, key: str, hashes: Iterable[int]) -> None:
        """A prefill of these blocks is running there: count them until `note_done`."""
        self._recent.setdefault(key, {}).update(dict.fromkeys(hashes, float("inf")))

    def note_done(self, key: str, hashes: Iterable[int]) -> None:
        """That prefill ended: its note lasts `recent_ttl_s` more, until events confirm it."""
        recent = self._recent.get(key)
        if recent is None:
            return  # forgotten meanwhile (the worker failed or left)
        expiry = self._clock() + self._recent_ttl_s
        recent.update(dict.fromkeys(hashes, expiry))

    # -- reading it -----------------------------------------------------------------------------

    def hashes(self, key: str) -> frozenset[int]:
        """The confirmed hashes of a worker (tests compare them to the worker's own)."""
        state = self._workers.get(key)
        return frozenset(state.hashes) if state else frozenset()

    def block_size(self, keys: Sequence[str]) -> int | None:
        """The block size the workers report (the first indexed one's), None if none is."""
        for key in keys:
            if key in self._workers:
                return self._workers[key].block_size
        return None

    def matched_blocks(self, key: str, prompt_hashes: Sequence[int]) -> int:
        """How many leading blocks of the prompt the worker holds (or was just sent)."""
        state = self._workers.get(key)
        confirmed = state.hashes if state else set()
        recent = self._recent.get(key, {})
        now = self._clock()
        n = 0
        for h in prompt_hashes:
            if h not in confirmed and recent.get(h, 0.0) <= now:
                break
            n += 1
        return n

    def prune(self) -> None:
        """Drop expired routing notes."""
        now = self._clock()
        for key, recent in list(self._recent.items()):
            live = {h: t for h, t in recent.items() if t > now}
            if live:
                self._recent[key] = live
            else:
                del self._recent[key]


def _apply_event(hashes: set[int], kind: str, event_hashes: tuple[int, ...]) -> None:
    if kind == "stored":
        hashes.update(event_hashes)
    elif kind == "removed":
        hashes.difference_update(event_hashes)
    else:
        hashes.clear()
