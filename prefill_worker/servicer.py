"""PrefillService on gRPC: protobuf -> PrefillWorker -> protobuf."""

from __future__ import annotations

import asyncio
import logging

import grpc

from kvtransfer import wire as kv_wire
from prefill_worker import wire
from prefill_worker.grpc_server import worker_status
from prefill_worker.worker import PrefillCall, PrefillWorker
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self._worker = worker

    async def Prefill(self, request, context):
        try:
            call = PrefillCall(
                transfer_id=request.transfer_id,
                prompt_token_ids=wire.prompt_from_pb(request.prompt_token_ids),
                params=wire.sampling_params_from_pb(request.sampling),
                request_id=request.request_id or request.transfer_id,
                lease_ms=request.lease_ms if request.HasField("lease_ms") else None,
            )
            outcome = await self._worker.prefill(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = worker_status(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("prefill failed transfer_id=%s", request.transfer_id)
            await context.abort(code, f"{type(exc).__name__}: {exc}")
        return worker_pb2.PrefillResponse(
            handle=kv_wire.handle_to_pb(outcome.handle),
            usage=common_pb2.Usage(
                prompt_tokens=outcome.num_prompt_tokens,
                completion_tokens=1,
                cached_prompt_tokens=outcome.num_cached_tokens,
            ),
        )

    async def Release(self, request, context):
        return worker_pb2.ReleaseResponse(released=self._worker.release(request.transfer_id))

    async def GetLoad(self, request, context):
        snap = self._worker.load_snapshot()
        return wire.load_report(
            snap.stats,
            engine_id=self._worker.identity.engine_id,
            epoch=self._worker.identity.epoch,
            role=self._worker.role,
            num_held=len(snap.held_transfer_ids),
            num_pending=snap.num_active,
            serving=self._worker.serving,
        )

    async def GetDebugState(self, request, context):
        snap = await self._worker.debug_snapshot()
        return common_pb2.DebugState(
            num_free_blocks=snap.stats.num_free_blocks,
            num_blocks=snap.stats.num_blocks,
            num_held_leases=len(snap.held_transfer_ids),
            held_transfer_ids=snap.held_transfer_ids,
            num_running=snap.stats.num_running,
            num_waiting=snap.stats.num_waiting,
            num_pending_imports=snap.stats.num_reserved,
            num_shm_segments=snap.num_shm_segments,
            num_active_streams=snap.num_active,
        )
