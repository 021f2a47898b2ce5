"""Typed asyncio client for one worker (PrefillService or DecodeService).

Protobuf stops here: the rest of the gateway sees dataclasses. The prefill worker's KV handle is
carried as an opaque `KVLease` and handed to the decode worker unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from contract.histogram import ITERATION_TOKENS_BUCKETS, QUEUE_TIME_BUCKETS, HistogramSnapshot
from contract.sampling import WORKER_FIELD_NAMES
from gateway.schema import FinishReason, GenerationParams, TokenLogprob
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from rpc.auth import cluster_token_metadata
from rpc.channel import channel_credentials, open_channel
from rpc.finish import finish_reason_from_pb
from rpc.logprobs import token_logprobs_from_pb
from rpc.sampling import fields_to_pb

MAX_MESSAGE_BYTES = 64 * 2**20


class WorkerRpcError(Exception):
    """A worker call failed with a gRPC status."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method} on {address} failed: {code.name}: {details}")
        self.address = address
        self.method = method
        self.code = code
        self.details = details


@dataclass(slots=True, frozen=True)
class LoadSnapshot:
    """A worker's LoadReport."""

    engine_id: str
    epoch: int
    role: str
    num_running: int
    num_waiting: int
    queue_depth: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    serving: bool
    kv_transfer_bytes_total: int = 0
    kv_transfer_seconds_total: float = 0.0
    block_size: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_emitted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()
    # Measured in the worker's engine; None from a worker that does not report them.
    queue_time: HistogramSnapshot | None = None
    iteration_tokens: HistogramSnapshot | None = None


@dataclass(slots=True, frozen=True)
class KVEventBatch:
    """One event of a worker's KV event log: `hashes` stored, removed, or (cleared) everything."""

    seq: int
    kind: str  # "stored" | "removed" | "cleared"
    hashes: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class KVEventsUpdate:
    """A GetKVEvents answer: events after the asked number, or a snapshot of every hash."""

    engine_id: str
    epoch: int
    block_size: int
    last_seq: int
    events: tuple[KVEventBatch, ...]
    snapshot: frozenset[int] | None


_EVENT_KINDS = {
    common_pb2.KV_EVENT_KIND_STORED: "stored",
    common_pb2.KV_EVENT_KIND_REMOVED: "removed",
    common_pb2.KV_EVENT_KIND_CLEARED: "cleared",
}


@dataclass(slots=True, frozen=True)
class SamplingRequest:
    """What a worker samples with: the request's parameters, resolved for one choice."""

    params: GenerationParams
    max_tokens: int  # resolved: never None on the wire
    seed: int | None


@dataclass(slots=True, frozen=True)
class KVLease:
    """A prefill worker's answer: the KV handle (opaque here), the prompt's cache hits and,
    when asked for, its prompt logprobs."""

    transfer_id: str
    handle: Any  # worker_pb2.KVHandle, passed to Decode untouched
    cached_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True, frozen=True)
class DecodeChunk:
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    cached_tokens: int | None  # from the last chunk's usage
    # Prompt tokens 1.. on the first chunk, from whichever worker ran the prompt.
    prompt_logprobs: list[TokenLogprob] | None = None


class DecodeCall:
    """An open Decode stream; `cancel()` ends it (the worker aborts the request)."""

    def __init__(self, address: str, call: Any, prompt_ids: list[int]) -> None:
        self._address = address
        self._call = call
        self._prompt_ids = prompt_ids

    async def chunks(self) -> AsyncIterator[DecodeChunk]:
        try:
            async for message in self._call:
                yield _decode_chunk(message, self._prompt_ids)
        except grpc.aio.AioRpcError as exc:
            raise WorkerRpcError(self._address, "Decode", exc.code(), exc.details() or "") from exc

    def cancel(self) -> None:
        self._call.cancel()


class WorkerClient:
    """One channel to one worker; every call takes a deadline."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.address = address
        # Sent with every call (the cluster token), not through a channel interceptor: an
        # intercepted stream relays each Decode chunk through one more layer.
        self._metadata = tuple(metadata) if metadata else None
        self._channel = open_channel(
            address,
            credentials=credentials,
            max_receive_bytes=MAX_MESSAGE_BYTES,
            max_send_bytes=MAX_MESSAGE_BYTES,
        )
        self._prefill = worker_pb2_grpc.PrefillServiceStub(self._channel)
        self._decode = worker_pb2_grpc.DecodeServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def get_load(self, role: str, timeout: float) -> LoadSnapshot:
        stub = self._prefill if role == "prefill" else self._decode
        report = await self._unary("GetLoad", stub.GetLoad, common_pb2.GetLoadRequest(), timeout)
        return _load_snapshot(report)

    async def get_kv_events(
        self, role: str, cursor: tuple[int, int] | None, timeout: float
    ) -> KVEventsUpdate:
        """Events after `cursor` = (epoch, last_seq) applied, or a snapshot when it is None."""
        stub = self._prefill if role == "prefill" else self._decode
        request = common_pb2.GetKVEventsRequest()
        if cursor is not None:
            request.epoch, request.after_seq = cursor
        response = await self._unary("GetKVEvents", stub.GetKVEvents, request, timeout)
        return _kv_events_update(response)

    async def prefill(
        self,
        transfer_id: str,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingRequest,
        timeout: float,
    ) -> KVLease:
        request = worker_pb2.PrefillRequest(
            transfer_id=transfer_id,
            prompt_token_ids=prompt_ids,
            sampling=_sampling_message(sampling),
            request_id=request_id,
        )
        response = await self._unary("Prefill", self._prefill.Prefill, request, timeout)
        return KVLease(
            transfer_id,
            response.handle,
            response.usage.cached_prompt_tokens,
            _prompt_logprobs(prompt_ids, response.prompt_logprobs, sampling),
        )

    async def release(self, transfer_id: str, timeout: float) -> bool:
        request = worker_pb2.ReleaseRequest(transfer_id=transfer_id)
        return (await self._unary("Release", self._prefill.Release, request, timeout)).released

    def decode(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingRequest,
        lease: KVLease | None,
        timeout: float,
    ) -> DecodeCall:
        request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=_sampling_message(sampling),
        )
        if lease is not None:
            request.kv_handle.CopyFrom(lease.handle)
        call = self._decode.Decode(request, timeout=timeout, metadata=self._metadata)
        return DecodeCall(self.address, call, prompt_ids)

    async def abort(self, request_id: str, timeout: float) -> bool:
        request = worker_pb2.AbortRequest(request_id=request_id)
        return (await self._unary("Abort", self._decode.Abort, request, timeout)).aborted

    async def _unary(self, method: str, rpc: Any, request: Any, timeout: float) -> Any:
        try:
            return await rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise WorkerRpcError(self.address, method, exc.code(), exc.details() or "") from exc


def client_factory(config) -> Callable[[str], WorkerClient]:
    """WorkerClients as a GatewayConfig says: TLS/mTLS and the cluster credential."""
    credentials = channel_credentials(
        config.worker_tls_ca, config.worker_tls_cert, config.worker_tls_key
    )
    metadata = cluster_token_metadata(config.cluster_secret)

    def make(address: str) -> WorkerClient:
        return WorkerClient(address, credentials=credentials, metadata=metadata)

    return make


def _sampling_message(sampling: SamplingRequest) -> common_pb2.SamplingParams:
    values = {name: getattr(sampling.params, name) for name in WORKER_FIELD_NAMES}
    values.update(max_tokens=sampling.max_tokens, seed=sampling.seed)
    return fields_to_pb(common_pb2.SamplingParams(), values)


def _decode_chunk(message: Any, prompt_ids: list[int]) -> DecodeChunk:
    token_ids = list(message.token_ids)
    logprobs = _token_logprobs(token_ids, message.logprobs) if len(message.logprobs) else None
    finish = finish_reason_from_pb(message.finish_reason)
    cached = message.usage.cached_prompt_tokens if message.HasField("usage") else None
    prompt = None
    if len(message.prompt_logprobs):
        prompt = _token_logprobs(prompt_ids[1:], message.prompt_logprobs)
    return DecodeChunk(token_ids, logprobs, finish, cached, prompt)


def _prompt_logprobs(
    prompt_ids: list[int], messages: Any, sampling: SamplingRequest
) -> list[TokenLogprob] | None:
    if sampling.params.prompt_logprobs is None:
        return None
    return _token_logprobs(prompt_ids[1:], messages)


def _token_logprobs(token_ids: Sequence[int], messages: Any) -> list[TokenLogprob]:
    return token_logprobs_from_pb(token_ids, messages, TokenLogprob)


def _load_snapshot(report: Any) -> LoadSnapshot:
    return LoadSnapshot(
        engine_id=report.engine_id,
        epoch=report.epoch,
        role=report.role,
        num_running=report.num_running,
        num_waiting=report.num_waiting,
        queue_depth=report.queue_depth,
        kv_cache_usage=report.kv_cache_usage,
        num_free_blocks=report.num_free_blocks,
        num_blocks=report.num_blocks,
        num_preemptions=report.num_preemptions,
        serving=report.serving,
        kv_transfer_bytes_total=report.kv_transfer_bytes_total,
        kv_transfer_seconds_total=report.kv_transfer_seconds_total,
        block_size=report.block_size,
        prefix_cache_queries=report.prefix_cache_queries,
        prefix_cache_hits=report.prefix_cache_hits,
        spec_decode_num_drafts=report.spec_decode_num_drafts,
        spec_decode_num_draft_tokens=report.spec_decode_num_draft_tokens,
        spec_decode_num_accepted_tokens=report.spec_decode_num_accepted_tokens,
        spec_decode_num_emitted_tokens=report.spec_decode_num_emitted_tokens,
        spec_decode_num_accepted_tokens_per_pos=tuple(
            report.spec_decode_num_accepted_tokens_per_pos
        ),
        queue_time=_histogram(
            QUEUE_TIME_BUCKETS, report.queue_time_bucket_counts, report.queue_time_sum
        ),
        iteration_tokens=_histogram(
            ITERATION_TOKENS_BUCKETS,
            report.iteration_tokens_bucket_counts,
            report.iteration_tokens_sum,
        ),
    )


def _histogram(bounds: tuple[float, ...], counts, total: float) -> HistogramSnapshot | None:
    """None when the counts do not fit the bounds: an older worker sends none."""
    if len(counts) != len(bounds) + 1:
        return None
    return HistogramSnapshot(bounds, tuple(counts), total)


def _kv_events_update(response: Any) -> KVEventsUpdate:
    events = tuple(
        KVEventBatch(e.seq, _EVENT_KINDS[e.kind], tuple(e.block_hashes))
        for e in response.events
        if e.kind in _EVENT_KINDS  # a kind from a newer worker: skipped, the gap check resyncs
    )
    return KVEventsUpdate(
        engine_id=response.engine_id,
        epoch=response.epoch,
        block_size=response.block_size,
        last_seq=response.last_seq,
        events=events,
        snapshot=frozenset(response.snapshot_hashes) if response.is_snapshot else None,
    )
