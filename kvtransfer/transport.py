"""How the bytes of one read travel from a prefill worker into our pool.

Control -- handshake, leases, release -- always goes over the KVTransferService on gRPC
(`client.py`); a `Transport` moves the page bytes of one read. Implementations live in
`transport_grpc.py` and `transport_shm.py` and are named in `transports.py`' registry; adding one
(CUDA IPC, NCCL, RDMA) is a new module and a registry entry, not a branch in the client.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import ClassVar, Protocol

import grpc

from kvtransfer.exporter import ReadRequest
from kvtransfer.layout import KVLayout
from kvtransfer.pages import PagedKV


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A prefill worker as its handshake describes it."""

    engine_id: str
    epoch: int
    layout: KVLayout
    compat_hash: str
    host_id: str
    shm_available: bool


@dataclass(frozen=True, slots=True)
class TransportOptions:
    streams: int = 2  # gRPC: concurrent ReadBlocks streams per read (layers split between them)
    shm_pieces: int = 1  # shared memory: segments per read, one requested ahead of the copy

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")


class Transport(Protocol):
    """Moves the pages of a validated read into our blocks. Writes only `dst_block_ids` (which
    nobody reads until the read returns) and, when cancelled, returns only after every copy into
    them has ended."""

    name: ClassVar[str]

    def __init__(self, channel: grpc.aio.Channel, local: PagedKV, options: TransportOptions): ...

    def usable(self, peer: PeerInfo, local_host_id: str) -> bool:
        """Whether this transport can reach `peer` from here at all."""
        ...

    async def read(
        self, request: ReadRequest, dst_block_ids: list[int], timeout: float | None
    ) -> int:
        """Copy the pages of `request` into `dst_block_ids`; the number of bytes moved. Raises
        TransferError (ChecksumError: these bytes were bad) when the bytes cannot be trusted."""
        ...

    def close(self) -> None: ...


def split(items: list[int], n: int) -> list[list[int]]:
    """`items` in at most n consecutive groups of nearly equal size."""
    n = max(1, min(n, len(items)))
    return [items[i * len(items) // n : (i + 1) * len(items) // n] for i in range(n)]


async def finish_even_if_cancelled(fn, *args):
    """Run fn(*args) in a thread and return its result; if the caller is cancelled, still wait
    for it to finish (the destination blocks must not be given back while a copy into them runs)."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
