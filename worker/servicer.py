"""The worker services on gRPC: protobuf -> worker -> protobuf, one servicer per role."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from kvtransfer import wire as kv_wire
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from rpc.status import details_of, status_for
from worker import wire
from worker.decode import DecodeCall, DecodeWorker
from worker.prefill import PrefillCall, PrefillWorker

log = logging.getLogger(__name__)
_MAX_KV_EVENTS = 4096  # per GetKVEvents answer; a reader further behind asks again


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self._worker = worker

    async def Prefill(self, request, context):
        try:
            call = PrefillCall(
                transfer_id=request.transfer_id,
                prompt_token_ids=wire.prompt_from_pb(request.prompt_token_ids),
                params=wire.sampling_params_from_pb(
                    request.sampling, self._worker.config.max_logprobs
                ),
                request_id=request.request_id or request.transfer_id,
                lease_ms=request.lease_ms if request.HasField("lease_ms") else None,
            )
            outcome = await self._worker.prefill(call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("prefill failed transfer_id=%s", request.transfer_id)
            await context.abort(code, details_of(exc))
        return worker_pb2.PrefillResponse(
            handle=kv_wire.handle_to_pb(outcome.handle),
            usage=common_pb2.Usage(
                prompt_tokens=outcome.num_prompt_tokens,
                completion_tokens=1,
                cached_prompt_tokens=outcome.num_cached_tokens,
            ),
            prompt_logprobs=wire.logprobs_to_pb(outcome.prompt_logprobs),
        )

    async def Release(self, request, context):
        return worker_pb2.ReleaseResponse(released=self._worker.release(request.transfer_id))

    async def GetLoad(self, request, context):
        return _load_report(self._worker)

    async def GetDebugState(self, request, context):
        return wire.debug_state(await self._worker.debug_snapshot())

    async def GetKVEvents(self, request, context):
        return _kv_events(self._worker, request)


def decode_status(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AioRpcError):  # from the prefill worker's KVTransferService
        # An unreachable prefill worker makes the KV handle unusable; it says nothing about
        # this worker. UNAVAILABLE would tell the gateway that this decode worker is down.
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return grpc.StatusCode.FAILED_PRECONDITION
        return exc.code()
    return status_for(exc)


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
        return _load_report(self._worker)

    async def GetDebugState(self, request, context):
        return wire.debug_state(await self._worker.debug_snapshot())

    async def GetKVEvents(self, request, context):
        return _kv_events(self._worker, request)

    def _call_from_pb(self, request, context) -> DecodeCall:
        remaining = context.time_remaining()
        return DecodeCall(
            request_id=request.request_id,
            prompt_token_ids=wire.prompt_from_pb(request.prompt_token_ids),
            params=wire.sampling_params_from_pb(request.sampling, self._worker.config.max_logprobs),
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


def _kv_events(worker: PrefillWorker | DecodeWorker, request) -> common_pb2.KVEventsResponse:
    engine = worker.engine_loop.engine
    same_start = request.HasField("after_seq") and request.epoch == worker.identity.epoch
    after_seq = request.after_seq if same_start else None
    read = engine.kv_events.read(after_seq, request.max_events or _MAX_KV_EVENTS)
    return wire.kv_events_to_pb(read, worker.identity, engine.config.block_size)


def _load_report(worker: PrefillWorker | DecodeWorker) -> common_pb2.LoadReport:
    return wire.load_report(worker.load_snapshot(), worker.identity, worker.role, worker.serving)
