"""DecodeService on gRPC: protobuf -> DecodeWorker -> stream of protobuf chunks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from decode_worker.worker import DecodeCall, DecodeWorker
from kvtransfer import wire as kv_wire
from kvtransfer.grpc_errors import status_for
from prefill_worker import wire
from prefill_worker.grpc_server import worker_status
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


def decode_status(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AioRpcError):  # from the prefill worker's KVTransferService
        # An unreachable prefill worker makes the KV handle unusable; it says nothing about
        # this worker. UNAVAILABLE would tell the gateway that this decode worker is down.
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return grpc.StatusCode.FAILED_PRECONDITION
        return exc.code()
    code = status_for(exc)
    return worker_status(exc) if code in (grpc.StatusCode.INTERNAL,) else code


class DecodeServicer(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self._worker = worker

    async def Decode(self, request, context):
        try:
            call = self._call_from_pb(request, context)
            async with contextlib.aclosing(self._worker.decode(call)) as outputs:
                completion = 0
                async for out in outputs:
                    completion += len(out.new_token_ids)
                    await context.write(wire.chunk_from_output(out, completion))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail(context, request.request_id, exc)

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(aborted=await self._worker.abort(request.request_id))

    async def GetLoad(self, request, context):
        snap = self._worker.load_snapshot()
        report = wire.load_report(
            snap.stats,
            engine_id=self._worker.engine_id,
            epoch=self._worker.epoch,
            role=self._worker.role,
            num_held=snap.stats.num_reserved,
            num_pending=snap.num_active,
            serving=self._worker.serving,
        )
        report.kv_transfer_bytes_total = self._worker.importer.bytes_pulled
        report.kv_transfer_seconds_total = self._worker.importer.seconds_pulling
        return report

    async def GetDebugState(self, request, context):
        snap = await self._worker.debug_snapshot()
        return common_pb2.DebugState(
            num_free_blocks=snap.stats.num_free_blocks,
            num_blocks=snap.stats.num_blocks,
            num_running=snap.stats.num_running,
            num_waiting=snap.stats.num_waiting,
            num_pending_imports=snap.stats.num_reserved,
            num_active_streams=snap.num_active,
        )

    def _call_from_pb(self, request, context) -> DecodeCall:
        remaining = context.time_remaining()
        return DecodeCall(
            request_id=request.request_id,
            prompt_token_ids=wire.prompt_from_pb(request.prompt_token_ids),
            params=wire.sampling_params_from_pb(request.sampling),
            handle=kv_wire.handle_from_pb(request.kv_handle)
            if request.HasField("kv_handle")
            else None,
            deadline=None if remaining is None else time.monotonic() + remaining,
        )

    async def _fail(self, context, request_id: str, exc: BaseException) -> None:
        code = decode_status(exc)
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("decode failed request_id=%s", request_id)
        else:
            log.warning("decode failed request_id=%s code=%s: %s", request_id, code.name, detail)
        await context.abort(code, f"{type(exc).__name__}: {detail}")
