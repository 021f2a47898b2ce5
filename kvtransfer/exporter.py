"""The prefill side of a transfer: validates reads against leases and produces page bytes.

Transport-neutral and protobuf-free; `service.py` puts it on gRPC.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from kvtransfer.chunking import ChunkParts, iter_packed_parts, iter_sliced_parts
from kvtransfer.layout import (
    KINDS,
    IncompatibleLayoutError,
    KVLayout,
    block_runs,
    check_compatible,
    transfer_bytes,
)
from kvtransfer.lease import FreeReason, Lease, LeaseError, LeaseTable
from kvtransfer.pages import KVAddressError, PagedKV
from kvtransfer.shm import ShmExporter, ShmSegmentInfo


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    engine_id: str
    epoch: int  # changes on every start: handles from an earlier instance are void
    host_id: str


@dataclass(frozen=True, slots=True)
class ReadRequest:
    transfer_id: str
    block_ids: tuple[int, ...]
    layers: tuple[int, ...]  # empty: all layers
    epoch: int
    compat_hash: str
    max_chunk_bytes: int = 0
    packed: bool = False  # chunks without slices (see chunking)


@dataclass(frozen=True, slots=True)
class ReadPlan:
    layers: tuple[int, ...]
    block_ids: tuple[int, ...]


class StaleEpochError(LeaseError):
    """The reader holds a handle from another instance of this worker."""


@dataclass(frozen=True, slots=True)
class ShmAttachment:
    """A shared-memory segment tied to a lease (dropped when the lease is freed)."""

    name: str


class KVExporter:
    def __init__(
        self,
        paged: PagedKV,
        leases: LeaseTable,
        identity: WorkerIdentity,
        shm: ShmExporter | None = None,
    ) -> None:
        self.paged = paged
        self.leases = leases
        self.identity = identity
        self.shm = shm
        self.compat_hash = paged.layout.compat_hash()

    @property
    def layout(self) -> KVLayout:
        return self.paged.layout

    def handshake(self, remote: KVLayout, remote_hash: str) -> None:
        """Raise IncompatibleLayoutError when the caller's pages would not mean ours."""
        check_compatible(self.layout, remote, remote_hash)

    @contextlib.contextmanager
    def open_read(self, request: ReadRequest) -> Iterator[ReadPlan]:
        """Validate a read and pin its lease for the duration of the block."""
        self._check_identity(request)
        with self.leases.pinned(request.transfer_id) as lease:
            yield self._plan(request, lease)

    def chunk_parts(
        self, plan: ReadPlan, max_chunk_bytes: int, *, packed: bool
    ) -> tuple[int, Iterator[ChunkParts]]:
        """(total bytes, chunks) of a read. On a CPU pool the chunks' parts are views of the
        pool's pages (read them while the lease is pinned); elsewhere, of one layer at a time
        copied to the host."""
        layers, blocks = list(plan.layers), list(plan.block_ids)
        page_bytes = self.layout.page_bytes
        total = transfer_bytes(len(layers), len(blocks), page_bytes)
        if packed:
            return total, iter_packed_parts(
                self.paged.page_ranges(layers, blocks), total, max_chunk_bytes
            )

        def pages() -> Iterator[tuple[int, int, int, memoryview]]:
            ranges = self.paged.page_ranges(layers, blocks)
            if self.paged.device.type != "cpu":  # one buffer per layer: (kind, block) pages
                for layer in layers:
                    buf = next(ranges)
                    for kind in KINDS:
                        for i, block in enumerate(blocks):
                            base = (kind * len(blocks) + i) * page_bytes
                            yield layer, kind, block, buf[base : base + page_bytes]
                return
            runs = block_runs(blocks)  # one buffer per (layer, kind, run of consecutive ids)
            for layer in layers:
                for kind in KINDS:
                    for first, count in runs:
                        buf = next(ranges)
                        for i in range(count):
                            page = buf[i * page_bytes : (i + 1) * page_bytes]
                            yield layer, kind, first + i, page

        return total, iter_sliced_parts(pages(), total, max_chunk_bytes)

    def export_shm(self, request: ReadRequest) -> ShmSegmentInfo:
        if self.shm is None:
            raise KVAddressError("shared-memory transport is disabled on this worker")
        with self.open_read(request) as plan:
            layers, blocks = list(plan.layers), list(plan.block_ids)
            size = len(layers) * 2 * len(blocks) * self.layout.page_bytes
            if self.paged.device.type == "cpu":  # one copy, checksummed as it goes

                def fill(out):
                    return self.paged.copy_out(layers, blocks, memoryview(out.numpy()))
            else:

                def fill(out):
                    return self.paged.gather(layers, blocks, out)

            info = self.shm.export(size, fill, layers, blocks)
            try:
                self.leases.attach(request.transfer_id, ShmAttachment(info.name))
            except LeaseError:
                self.shm.drop(info.name)
                raise
        return info

    def drop_attachments(self, lease: Lease) -> None:
        """Free what a lease carries besides its blocks (call from the lease's on_free). A
        released lease's segments go back to the pool (the reader has finished with them); an
        expired or shut-down lease's are unlinked (a late reader keeps the old bytes)."""
        for item in lease.attachments:
            if isinstance(item, ShmAttachment) and self.shm is not None:
                if lease.doomed is FreeReason.RELEASED:
                    self.shm.recycle(item.name)
                else:
                    self.shm.drop(item.name)
        lease.attachments.clear()

    def _check_identity(self, request: ReadRequest) -> None:
        if request.epoch != self.identity.epoch:
            raise StaleEpochError(
                f"handle is from worker epoch {request.epoch}, this worker is epoch "
                f"{self.identity.epoch} (restarted): prefill again"
            )
        if request.compat_hash != self.compat_hash:
            raise IncompatibleLayoutError(
                f"reader's compatibility hash {request.compat_hash!r} != {self.compat_hash!r}"
            )

    def _plan(self, request: ReadRequest, lease: Lease) -> ReadPlan:
        layers = request.layers or tuple(range(self.layout.num_layers))
        self.paged.check_layers(layers)
        self.paged.check_blocks(request.block_ids)
        held = set(lease.block_ids)
        foreign = [b for b in request.block_ids if b not in held]
        if foreign:
            raise KVAddressError(
                f"blocks {foreign[:8]} are not held by transfer {request.transfer_id!r}"
            )
        return ReadPlan(tuple(layers), tuple(request.block_ids))
