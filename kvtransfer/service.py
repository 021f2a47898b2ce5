"""KVTransferService on gRPC (asyncio): protobuf in, KVExporter, protobuf out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import grpc

from kvtransfer import wire
from kvtransfer.chunking import Chunk, iter_chunks
from kvtransfer.exporter import KVExporter, ReadPlan
from kvtransfer.grpc_errors import abort_with
from protos.pdserve.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc

log = logging.getLogger(__name__)


class KVTransferServicer(kvtransfer_pb2_grpc.KVTransferServiceServicer):
    def __init__(self, exporter: KVExporter, *, transfer_delay_s: float = 0.0) -> None:
        self._exporter = exporter
        self._delay_s = transfer_delay_s  # debug: sleep before every chunk (tests of expiry/cancel)
        self.bytes_sent = 0

    async def Handshake(self, request, context):
        try:
            self._exporter.handshake(wire.layout_from_pb(request.layout), request.compat_hash)
        except Exception as exc:
            log.warning("kv handshake refused: %s", exc)
            await abort_with(context, exc)
        ident = self._exporter.identity
        return kvtransfer_pb2.HandshakeResponse(
            engine_id=ident.engine_id,
            epoch=ident.epoch,
            layout=wire.layout_to_pb(self._exporter.layout),
            compat_hash=self._exporter.compat_hash,
            host_id=ident.host_id,
            max_chunk_bytes=1 << 20,
            shm_available=self._exporter.shm is not None,
        )

    async def ReadBlocks(self, request, context):
        req = wire.read_request_from_pb(request)
        try:
            with self._exporter.open_read(req) as plan:
                async for chunk in self._chunks(plan, req.max_chunk_bytes):
                    await context.write(wire.chunk_to_pb(chunk))
                    self.bytes_sent += len(chunk.data)
        except asyncio.CancelledError:
            log.info("kv read cancelled transfer_id=%s", req.transfer_id)
            raise
        except Exception as exc:
            log.warning("kv read failed transfer_id=%s: %s", req.transfer_id, exc)
            await abort_with(context, exc)

    async def ReadBlocksShm(self, request, context):
        req = wire.read_request_from_pb(request)
        try:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            info = await asyncio.to_thread(self._exporter.export_shm, req)
        except Exception as exc:
            log.warning("kv shm read failed transfer_id=%s: %s", req.transfer_id, exc)
            await abort_with(context, exc)
        self.bytes_sent += info.size
        return wire.shm_to_pb(info)

    async def ExtendLease(self, request, context):
        try:
            remaining = self._exporter.leases.extend(request.transfer_id, request.lease_ms or None)
        except Exception as exc:
            await abort_with(context, exc)
        return kvtransfer_pb2.ExtendLeaseResponse(lease_ms=remaining)

    async def Release(self, request, context):
        released = self._exporter.leases.release(request.transfer_id)
        log.info("kv release transfer_id=%s released=%s", request.transfer_id, released)
        return kvtransfer_pb2.KVReleaseResponse(released=released)

    async def _chunks(self, plan: ReadPlan, max_chunk_bytes: int):
        """Chunks produced off the event loop, one thread hop per chunk. The lease stays pinned
        by the caller until the last one (or cancellation) -- and no longer than the thread that
        reads pages: a cancelled read waits for the page copy in flight before unpinning."""
        chunks: Iterator[Chunk] = iter_chunks(
            plan.layers,
            plan.block_ids,
            self._exporter.layout.page_bytes,
            lambda layer: self._exporter.layer_bytes(plan, layer),
            max_chunk_bytes,
        )
        loop = asyncio.get_running_loop()
        while True:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            future = loop.run_in_executor(None, next, chunks, None)
            try:
                chunk = await asyncio.shield(future)
            except asyncio.CancelledError:
                await asyncio.wait([future])
                raise
            if chunk is None:
                return
            yield chunk


def add_to_server(server: grpc.aio.Server, servicer: KVTransferServicer) -> None:
    kvtransfer_pb2_grpc.add_KVTransferServiceServicer_to_server(servicer, server)
