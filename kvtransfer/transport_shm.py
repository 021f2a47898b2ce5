"""Page bytes through POSIX shared memory (same host): the peer gathers the pages into a segment
and names it; we copy from our mapping of it into the pool, checking its CRC-32. See shm.py."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc

from kvtransfer import wire
from kvtransfer.chunking import ChecksumError, TransferError
from kvtransfer.exporter import ReadRequest
from kvtransfer.layout import transfer_bytes
from kvtransfer.pages import PagedKV
from kvtransfer.shm import ShmReader, ShmSegmentInfo
from kvtransfer.transport import (
    PeerInfo,
    TransportOptions,
    finish_even_if_cancelled,
    split,
)
from protos.pdserve.v1 import kvtransfer_pb2_grpc


class ShmTransport:
    name = "shm"

    def __init__(self, channel: grpc.aio.Channel, local: PagedKV, options: TransportOptions):
        self._stub = kvtransfer_pb2_grpc.KVTransferServiceStub(channel)
        self._local = local
        self._pieces = max(1, options.shm_pieces)
        self._reader = ShmReader()

    def usable(self, peer: PeerInfo, local_host_id: str) -> bool:
        return peer.host_id == local_host_id and peer.shm_available

    async def read(
        self, request: ReadRequest, dst_block_ids: list[int], timeout: float | None
    ) -> int:
        """ReadBlocksShm per group of layers (`shm_pieces`), one request ahead: the peer gathers
        the next group while we copy this one in."""
        layout = self._local.layout
        groups = split(list(range(layout.num_layers)), self._pieces)

        async def segment(layers: list[int]) -> ShmSegmentInfo:
            req = (
                request if len(groups) == 1 else dataclasses.replace(request, layers=tuple(layers))
            )
            reply = await self._stub.ReadBlocksShm(wire.read_request_to_pb(req), timeout=30)
            info = wire.shm_from_pb(reply)
            if list(info.block_ids) != list(request.block_ids) or list(info.layers) != layers:
                raise TransferError("shared-memory segment does not hold the requested pages")
            return info

        ahead = asyncio.ensure_future(segment(groups[0]))
        try:
            for i, layers in enumerate(groups):
                info = await ahead
                if i + 1 < len(groups):
                    ahead = asyncio.ensure_future(segment(groups[i + 1]))
                await finish_even_if_cancelled(self._copy_in, info, layers, dst_block_ids)
        finally:
            if not ahead.done():
                ahead.cancel()
                await asyncio.wait([ahead])
        return transfer_bytes(layout.num_layers, len(dst_block_ids), layout.page_bytes)

    def close(self) -> None:
        self._reader.close()

    def _copy_in(self, info: ShmSegmentInfo, layers: list[int], dst_block_ids: list[int]) -> None:
        """Straight from our mapping of the segment into the pool, checksumming the bytes as
        they are copied: bytes changed under the copy (a reused segment) fail the transfer."""
        layout = self._local.layout
        expected = transfer_bytes(len(layers), len(dst_block_ids), layout.page_bytes)
        with self._reader.open(info, expected) as flat:
            if self._local.device.type == "cpu":
                crc = self._local.copy_in(layers, dst_block_ids, memoryview(flat.numpy()))
                if crc != info.crc32:
                    raise ChecksumError(f"segment {info.name}: CRC-32 mismatch")
            else:
                pages = flat.view(len(layers), 2, len(dst_block_ids), layout.page_bytes)
                self._local.scatter(layers, dst_block_ids, pages)
                del pages
                self._reader.verify(info, flat)
