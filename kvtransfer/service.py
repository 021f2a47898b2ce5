"""KVTransferService on gRPC (asyncio): protobuf in, KVExporter, protobuf out."""

from __future__ import annotations

import asyncio
import logging

import grpc

from kvtransfer import wire
from kvtransfer.chunking import MAX_CHUNK_BYTES
from kvtransfer.exporter import KVExporter, ReadPlan
from protos.pdserve.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc
from rpc.status import abort_with

log = logging.getLogger(__name__)

SERVICE = "KVTransferService"


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
            max_chunk_bytes=MAX_CHUNK_BYTES,
            shm_available=self._exporter.shm is not None,
        )

    async def ReadBlocks(self, request, context):
        req = wire.read_request_from_pb(request)
        try:
            with self._exporter.open_read(req) as plan:
                async for raw, nbytes in self._chunks(plan, req.max_chunk_bytes, req.packed):
                    await context.write(raw)
                    self.bytes_sent += nbytes
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

    async def _chunks(self, plan: ReadPlan, max_chunk_bytes: int, packed: bool):
        """(wire bytes, data bytes) of each chunk. The lease stays pinned by the caller until the
        last one (or cancellation). On a CPU pool a chunk is one copy from the pool's pages into
        the message, done right here (about a millisecond per MiB at worst); other pools copy a
        layer at a time to the host, on a worker thread so the event loop stays responsive -- and
        a cancelled read waits for the copy in flight before unpinning."""
        total, parts = self._exporter.chunk_parts(plan, max_chunk_bytes, packed=packed)

        def step():
            p = next(parts, None)
            return None if p is None else (wire.encode_chunk(p, total), p.nbytes)

        inline = self._exporter.paged.device.type == "cpu"
        loop = asyncio.get_running_loop()
        while True:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            if inline:
                item = step()
            else:
                future = loop.run_in_executor(None, step)
                try:
                    item = await asyncio.shield(future)
                except asyncio.CancelledError:
                    await asyncio.wait([future])
                    raise
            if item is None:
                return
            yield item


def add_to_server(server: grpc.aio.Server, servicer: KVTransferServicer) -> None:
    """The generated registration, except that ReadBlocks' responses are the wire bytes that
    `wire.encode_chunk` writes (no KVChunk object, no second copy of the data)."""
    pb = kvtransfer_pb2
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            servicer.Handshake,
            request_deserializer=pb.HandshakeRequest.FromString,
            response_serializer=pb.HandshakeResponse.SerializeToString,
        ),
        "ReadBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.ReadBlocks,
            request_deserializer=pb.ReadBlocksRequest.FromString,
            response_serializer=wire.serialize_chunk,
        ),
        "ReadBlocksShm": grpc.unary_unary_rpc_method_handler(
            servicer.ReadBlocksShm,
            request_deserializer=pb.ReadBlocksRequest.FromString,
            response_serializer=pb.ShmSegment.SerializeToString,
        ),
        "ExtendLease": grpc.unary_unary_rpc_method_handler(
            servicer.ExtendLease,
            request_deserializer=pb.ExtendLeaseRequest.FromString,
            response_serializer=pb.ExtendLeaseResponse.SerializeToString,
        ),
        "Release": grpc.unary_unary_rpc_method_handler(
            servicer.Release,
            request_deserializer=pb.KVReleaseRequest.FromString,
            response_serializer=pb.KVReleaseResponse.SerializeToString,
        ),
    }
    missing = set(pb.DESCRIPTOR.services_by_name[SERVICE].methods_by_name) - set(handlers)
    assert not missing, f"KVTransferService methods without a handler: {missing}"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(f"pdserve.v1.{SERVICE}", handlers)
