"""The decode side of a transfer: pulls pages from a prefill worker's KVTransferService.

Control always goes over gRPC; bytes go over the same gRPC stream (bounded, checksummed chunks)
or, when both workers share a host, through a shared-memory segment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

import grpc

from kvtransfer import wire
from kvtransfer.chunking import ChecksumError, ChunkAssembler, TransferError, transfer_bytes
from kvtransfer.exporter import ReadRequest
from kvtransfer.layout import KVLayout, check_compatible
from kvtransfer.pages import PagedKV
from kvtransfer.shm import ShmReader, ShmSegmentInfo
from protos.pdserve.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc
from rpc.channel import open_channel

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "grpc", "shm")
_MAX_MESSAGE = 8 << 20  # chunks are <= 1 MiB; leave room for the envelope


@dataclass(frozen=True, slots=True)
class PeerInfo:
    engine_id: str
    epoch: int
    layout: KVLayout
    compat_hash: str
    host_id: str
    shm_available: bool


@dataclass(frozen=True, slots=True)
class PullResult:
    transport: str  # "grpc" or "shm"
    num_bytes: int
    seconds: float


class KVTransferClient:
    """Talks to one prefill worker. Safe to share between the requests of one event loop."""

    def __init__(
        self,
        endpoint: str,
        local: PagedKV,
        *,
        local_host_id: str,
        transport: str = "auto",
        credentials: grpc.ChannelCredentials | None = None,
        max_chunk_bytes: int = 0,
        streams: int = 2,
        shm_pieces: int = 1,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self._channel = open_channel(
            endpoint, credentials=credentials, max_receive_bytes=_MAX_MESSAGE
        )
        self._stub = kvtransfer_pb2_grpc.KVTransferServiceStub(self._channel)
        # ReadBlocks with the raw response bytes: wire.chunk_from_bytes reads the data in place.
        self._read_blocks = self._channel.unary_stream(
            "/pdserve.v1.KVTransferService/ReadBlocks",
            request_serializer=kvtransfer_pb2.ReadBlocksRequest.SerializeToString,
            response_deserializer=None,
        )
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        self._streams = streams
        self._shm_pieces = max(1, shm_pieces)
        self._shm = ShmReader()
        self.endpoint = endpoint
        self._local = local
        self._local_host_id = local_host_id
        self._transport = transport
        self._max_chunk_bytes = max_chunk_bytes
        self._peer: PeerInfo | None = None
        self._shm_broken = False  # set when a same-host segment could not be attached

    async def handshake(self, *, refresh: bool = False, timeout: float | None = 10.0) -> PeerInfo:
        """Compare layouts (IncompatibleLayoutError on mismatch); cached until `refresh`."""
        if self._peer is not None and not refresh:
            return self._peer
        layout = self._local.layout
        reply = await self._stub.Handshake(
            kvtransfer_pb2.HandshakeRequest(
                layout=wire.layout_to_pb(layout), compat_hash=layout.compat_hash()
            ),
            timeout=timeout,
        )
        remote = wire.layout_from_pb(reply.layout)
        check_compatible(layout, remote, reply.compat_hash)
        self._peer = PeerInfo(
            reply.engine_id,
            reply.epoch,
            remote,
            reply.compat_hash,
            reply.host_id,
            reply.shm_available,
        )
        log.info(
            "kv handshake endpoint=%s engine_id=%s epoch=%d transport=%s",
            self.endpoint,
            reply.engine_id,
            reply.epoch,
            self._pick(self._peer),
        )
        return self._peer

    async def pull(
        self,
        transfer_id: str,
        epoch: int,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        *,
        timeout: float | None = None,
    ) -> PullResult:
        """Copy the peer's pages of `src_block_ids` (all layers) into our `dst_block_ids`."""
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError("source and destination block lists differ in length")
        peer = await self.handshake()
        if peer.epoch != epoch:
            peer = await self.handshake(refresh=True)
        request = ReadRequest(
            transfer_id,
            tuple(src_block_ids),
            (),
            epoch,
            peer.compat_hash,
            self._max_chunk_bytes,
            packed=True,
        )
        start = time.perf_counter()
        transport = self._pick(peer)
        shm_suspect = False
        if transport == "shm":
            try:
                num_bytes = await self._pull_shm(request, dst_block_ids)
            except ChecksumError as exc:  # bytes changed under us: this transfer only
                if self._transport == "shm":
                    raise
                log.warning("kv shm transfer failed (%s), pulling over grpc instead", exc)
                transport = "grpc"
            except TransferError as exc:
                if self._transport == "shm":
                    raise
                log.warning("kv shm unusable (%s), falling back to grpc", exc)
                shm_suspect, transport = True, "grpc"
        if transport == "grpc":
            num_bytes = await self._read_grpc(request, dst_block_ids, timeout)
            # Blame shared memory only once the same transfer was readable over gRPC: a segment
            # also vanishes when its lease ends (expired or released), and then this read fails.
            self._shm_broken = self._shm_broken or shm_suspect
        return PullResult(transport, num_bytes, time.perf_counter() - start)

    async def extend(self, transfer_id: str, lease_ms: int) -> int:
        reply = await self._stub.ExtendLease(
            kvtransfer_pb2.ExtendLeaseRequest(transfer_id=transfer_id, lease_ms=lease_ms),
            timeout=10,
        )
        return reply.lease_ms

    async def release(self, transfer_id: str, *, timeout: float | None = 10.0) -> bool:
        reply = await self._stub.Release(
            kvtransfer_pb2.KVReleaseRequest(transfer_id=transfer_id), timeout=timeout
        )
        return reply.released

    async def close(self) -> None:
        await self._channel.close()
        self._shm.close()

    def _pick(self, peer: PeerInfo) -> str:
        if self._transport != "auto":
            return self._transport
        same_host = peer.host_id == self._local_host_id and peer.shm_available
        return "shm" if same_host and not self._shm_broken else "grpc"

    async def _read_grpc(
        self, request: ReadRequest, dst_block_ids: list[int], timeout: float | None
    ) -> int:
        """ReadBlocks over `streams` concurrent streams (layers split between them)."""
        groups = _split(list(range(self._local.layout.num_layers)), self._streams)
        reads = [self._read_stream(request, g, dst_block_ids, timeout) for g in groups]
        if len(groups) == 1:
            return await reads[0]
        tasks = [asyncio.ensure_future(r) for r in reads]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)  # every copy into our blocks has ended
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return sum(task.result() for task in tasks)

    async def _read_stream(
        self,
        request: ReadRequest,
        layers: list[int],
        dst_block_ids: list[int],
        timeout: float | None,
    ) -> int:
        """One ReadBlocks stream. On a CPU pool each verified chunk is copied straight into our
        blocks, on the event loop (no copy is in flight when the task is cancelled); elsewhere
        the chunks are staged and scattered at the end."""
        layout = self._local.layout
        direct = self._local.device.type == "cpu"
        assembler = ChunkAssembler(
            layers,
            list(request.block_ids),
            layout.page_bytes,
            into=self._local if direct else None,
            dst_block_ids=dst_block_ids if direct else None,
        )
        if len(layers) != layout.num_layers:
            request = dataclasses.replace(request, layers=tuple(layers))
        call = self._read_blocks(wire.read_request_to_pb(request), timeout=timeout)
        try:
            async for raw in call:
                assembler.add(wire.chunk_from_bytes(raw))
        except BaseException:
            call.cancel()
            raise
        staging = assembler.finish()
        if staging is not None:
            await _finish_even_if_cancelled(self._local.scatter, layers, dst_block_ids, staging)
        return assembler.total_bytes

    async def _pull_shm(self, request: ReadRequest, dst_block_ids: list[int]) -> int:
        """ReadBlocksShm per group of layers (`shm_pieces`), one request ahead: the peer gathers
        the next group while we copy this one in."""
        layout = self._local.layout
        groups = _split(list(range(layout.num_layers)), self._shm_pieces)

        async def read(layers: list[int]) -> ShmSegmentInfo:
            req = (
                request if len(groups) == 1 else dataclasses.replace(request, layers=tuple(layers))
            )
            reply = await self._stub.ReadBlocksShm(wire.read_request_to_pb(req), timeout=30)
            info = wire.shm_from_pb(reply)
            if list(info.block_ids) != list(request.block_ids) or list(info.layers) != layers:
                raise TransferError("shared-memory segment does not hold the requested pages")
            return info

        def copy_in(info: ShmSegmentInfo, layers: list[int]) -> None:
            # Straight from our mapping of the segment into the pool, checksumming the bytes as
            # they are copied: bytes changed under the copy (a reused segment) fail the transfer.
            expected = transfer_bytes(len(layers), len(dst_block_ids), layout.page_bytes)
            with self._shm.open(info, expected) as flat:
                if self._local.device.type == "cpu":
                    crc = self._local.copy_in(layers, dst_block_ids, memoryview(flat.numpy()))
                    if crc != info.crc32:
                        raise ChecksumError(f"segment {info.name}: CRC-32 mismatch")
                else:
                    pages = flat.view(len(layers), 2, len(dst_block_ids), layout.page_bytes)
                    self._local.scatter(layers, dst_block_ids, pages)
                    del pages
                    self._shm.verify(info, flat)

        ahead = asyncio.ensure_future(read(groups[0]))
        try:
            for i, layers in enumerate(groups):
                info = await ahead
                if i + 1 < len(groups):
                    ahead = asyncio.ensure_future(read(groups[i + 1]))
                await _finish_even_if_cancelled(copy_in, info, layers)
        finally:
            if not ahead.done():
                ahead.cancel()
                await asyncio.wait([ahead])
        return transfer_bytes(layout.num_layers, len(dst_block_ids), layout.page_bytes)


def _split(items: list[int], n: int) -> list[list[int]]:
    """`items` in at most n consecutive groups of nearly equal size."""
    n = max(1, min(n, len(items)))
    return [items[i * len(items) // n : (i + 1) * len(items) // n] for i in range(n)]


async def _finish_even_if_cancelled(fn, *args) -> None:
    """Run fn(*args) in a thread; if the caller is cancelled, still wait for it to finish (the
    destination blocks must not be given back while a copy into them runs)."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
