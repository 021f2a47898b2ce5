"""Page bytes over gRPC: ReadBlocks streams of bounded, checksummed chunks (any two hosts)."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc

from kvtransfer import wire
from kvtransfer.chunking import ChunkAssembler
from kvtransfer.exporter import ReadRequest
from kvtransfer.pages import PagedKV
from kvtransfer.transport import (
    PeerInfo,
    TransportOptions,
    finish_even_if_cancelled,
    split,
)
from protos.pdserve.v1 import kvtransfer_pb2


class GrpcTransport:
    name = "grpc"

    def __init__(self, channel: grpc.aio.Channel, local: PagedKV, options: TransportOptions):
        # ReadBlocks with the raw response bytes: wire.chunk_from_bytes reads the data in place.
        self._read_blocks = channel.unary_stream(
            "/pdserve.v1.KVTransferService/ReadBlocks",
            request_serializer=kvtransfer_pb2.ReadBlocksRequest.SerializeToString,
            response_deserializer=None,
        )
        self._local = local
        self._streams = options.streams

    def usable(self, peer: PeerInfo, local_host_id: str) -> bool:
        return True

    async def read(
        self, request: ReadRequest, dst_block_ids: list[int], timeout: float | None
    ) -> int:
        """ReadBlocks over `streams` concurrent streams (layers split between them)."""
        groups = split(list(range(self._local.layout.num_layers)), self._streams)
        reads = [self._read_stream(request, g, dst_block_ids, timeout) for g in groups]
        if len(groups) == 1:
            return await reads[0]
        tasks = [asyncio.ensure_future(r) for r in reads]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)  # every copy into our blocks has ended
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return sum(task.result() for task in tasks)

    def close(self) -> None:
        pass

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
            await finish_even_if_cancelled(self._local.scatter, layers, dst_block_ids, staging)
        return assembler.total_bytes
