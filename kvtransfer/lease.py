"""Leases: a transfer id holds the prefill worker's KV blocks for a bounded time.

Invariants (checked by tests):
- a lease is freed exactly once (`on_free` called once), for one reason: released, expired or
  shutdown;
- a pinned lease (a read in progress) is never freed under the reader: expiry and release are
  deferred until the last unpin;
- after expiry or release, `pin`/`extend` fail (ExpiredLeaseError / UnknownLeaseError), so a late
  reader never sees bytes of freed blocks.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from contract.errors import ErrorKind

log = logging.getLogger(__name__)

_REMEMBER_GONE = 4096  # recently finished ids, to tell "expired" from "never existed"


class FreeReason(enum.Enum):
    RELEASED = "released"
    EXPIRED = "expired"
    SHUTDOWN = "shutdown"


class LeaseError(Exception):
    """Unknown or expired lease, or a stale epoch: the caller must prefill again."""

    kind = ErrorKind.PRECONDITION


class UnknownLeaseError(LeaseError):
    pass


class ExpiredLeaseError(LeaseError):
    pass


@dataclass(slots=True)
class Lease:
    transfer_id: str
    block_ids: tuple[int, ...]
    expires_at: float  # monotonic seconds
    owner: str = ""  # e.g. the engine request id holding the blocks
    pins: int = 0
    doomed: FreeReason | None = None  # set once freeing is decided; freed at the last unpin
    attachments: list[object] = field(default_factory=list)  # e.g. shared-memory segments


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    default_ms: int = 30_000
    max_ms: int = 300_000
    reap_interval_s: float = 0.05

    def __post_init__(self) -> None:
        if self.default_ms < 1 or self.max_ms < self.default_ms:
            raise ValueError(
                f"need 1 <= default_ms <= max_ms, got {self.default_ms}, {self.max_ms}"
            )
        if self.reap_interval_s <= 0:
            raise ValueError(f"reap_interval_s must be > 0, got {self.reap_interval_s}")


class LeaseTable:
    """Thread-safe table of leases. `on_free(lease, reason)` runs outside the lock, once per lease."""

    def __init__(
        self,
        on_free: Callable[[Lease, FreeReason], None],
        config: LeaseConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or LeaseConfig()
        self._on_free = on_free
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._gone: OrderedDict[str, FreeReason] = OrderedDict()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- grant / extend / release -----------------------------------------------------------

    def grant(
        self, transfer_id: str, block_ids: list[int], lease_ms: int | None = None, owner: str = ""
    ) -> Lease:
        if not transfer_id:
            raise ValueError("transfer_id must be non-empty")
        ms = self._clamp(lease_ms)
        with self._lock:
            if transfer_id in self._leases:
                raise ValueError(f"transfer {transfer_id!r} already holds a lease")
            lease = Lease(transfer_id, tuple(block_ids), self._clock() + ms / 1000, owner)
            self._leases[transfer_id] = lease
            self._gone.pop(transfer_id, None)
        return lease

    def extend(self, transfer_id: str, lease_ms: int | None = None) -> int:
        """Push the expiry to now + lease_ms; returns the remaining lease in ms."""
        ms = self._clamp(lease_ms)
        with self._lock:
            lease = self._live(transfer_id)
            lease.expires_at = max(lease.expires_at, self._clock() + ms / 1000)
            return self._remaining_ms(lease)

    def release(self, transfer_id: str) -> bool:
        """Free a lease (deferred while pinned). False if it was unknown or already gone."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None or lease.doomed is not None:
                return False
            to_free = self._doom(lease, FreeReason.RELEASED)
        self._free(to_free)
        return True

    def attach(self, transfer_id: str, resource: object) -> None:
        """Tie a resource (freed by on_free) to a live lease."""
        with self._lock:
            self._live(transfer_id).attachments.append(resource)

    # -- reading under a lease ---------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self, transfer_id: str) -> Iterator[Lease]:
        """Hold the lease's blocks for a read: not freed until the block exits."""
        with self._lock:
            lease = self._live(transfer_id)
            lease.pins += 1
        try:
            yield lease
        finally:
            with self._lock:
                lease.pins -= 1
                to_free = [lease] if lease.pins == 0 and lease.doomed is not None else []
                if to_free:
                    self._forget(lease)
            self._free(to_free)

    # -- expiry ------------------------------------------------------------------------------

    def reap(self) -> list[str]:
        """Expire every lease past its deadline; returns their transfer ids."""
        now = self._clock()
        to_free: list[Lease] = []
        expired: list[str] = []
        with self._lock:
            for lease in list(self._leases.values()):
                if lease.doomed is None and lease.expires_at <= now and lease.pins == 0:
                    expired.append(lease.transfer_id)
                    to_free += self._doom(lease, FreeReason.EXPIRED)
        for lease in to_free:
            log.info(
                "lease expired transfer_id=%s blocks=%d", lease.transfer_id, len(lease.block_ids)
            )
        self._free(to_free)
        return expired

    def start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Thread(
                target=self._reap_loop, name="lease-reaper", daemon=True
            )
            self._reaper.start()

    def close(self) -> None:
        """Stop the reaper and free every lease (reason SHUTDOWN)."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        with self._lock:
            to_free: list[Lease] = []
            for lease in list(self._leases.values()):
                if lease.doomed is None:
                    to_free += self._doom(lease, FreeReason.SHUTDOWN)
        self._free(to_free)

    # -- inspection --------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def transfer_ids(self) -> list[str]:
        with self._lock:
            return list(self._leases)

    def held_blocks(self) -> int:
        with self._lock:
            return sum(len(lease.block_ids) for lease in self._leases.values())

    def get(self, transfer_id: str) -> Lease:
        """The live lease (raises like `pinned`)."""
        with self._lock:
            return self._live(transfer_id)

    # -- internals (call with the lock held) -------------------------------------------------

    def _live(self, transfer_id: str) -> Lease:
        lease = self._leases.get(transfer_id)
        if lease is not None and lease.doomed is None:
            if lease.expires_at > self._clock() or lease.pins > 0:
                return lease
            raise ExpiredLeaseError(f"lease of transfer {transfer_id!r} has expired")
        reason = lease.doomed if lease is not None else self._gone.get(transfer_id)
        if reason is FreeReason.EXPIRED:
            raise ExpiredLeaseError(f"lease of transfer {transfer_id!r} has expired")
        if reason is not None:
            raise UnknownLeaseError(f"transfer {transfer_id!r} was already {reason.value}")
        raise UnknownLeaseError(f"unknown transfer {transfer_id!r}")

    def _doom(self, lease: Lease, reason: FreeReason) -> list[Lease]:
        lease.doomed = reason
        self._gone[lease.transfer_id] = reason
        while len(self._gone) > _REMEMBER_GONE:
            self._gone.popitem(last=False)
        if lease.pins > 0:
            return []  # the last unpin frees it
        self._forget(lease)
        return [lease]

    def _forget(self, lease: Lease) -> None:
        self._leases.pop(lease.transfer_id, None)

    def _remaining_ms(self, lease: Lease) -> int:
        return max(0, int((lease.expires_at - self._clock()) * 1000))

    def _clamp(self, lease_ms: int | None) -> int:
        if lease_ms is None or lease_ms <= 0:
            return self.config.default_ms
        return min(lease_ms, self.config.max_ms)

    def _free(self, leases: list[Lease]) -> None:
        for lease in leases:
            try:
                self._on_free(lease, lease.doomed or FreeReason.RELEASED)
            except Exception:
                log.exception("freeing lease transfer_id=%s failed", lease.transfer_id)

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.config.reap_interval_s):
            try:
                self.reap()
            except Exception:
                log.exception("lease reaper pass failed")
