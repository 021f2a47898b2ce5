"""protobuf <-> engine objects for the worker services (both roles)."""

from __future__ import annotations

from contract.limits import MAX_LOGPROBS
from engine.kv_events import KVEventKind, KVEventsRead
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from kvtransfer.exporter import WorkerIdentity
from kvtransfer.wire import token_logprobs_to_pb
from protos.pdserve.v1 import common_pb2, worker_pb2
from rpc.finish import finish_reason_to_pb
from rpc.sampling import fields_from_pb
from worker.snapshot import WorkerSnapshot


def sampling_params_from_pb(
    msg: common_pb2.SamplingParams, max_logprobs: int = MAX_LOGPROBS
) -> SamplingParams:
    """Unset fields keep the engine's defaults. Raises ValueError on invalid values, and on
    more logprobs than `max_logprobs` (the worker's --max-logprobs)."""
    values = fields_from_pb(msg)
    for name in ("logprobs", "prompt_logprobs"):
        value = values.get(name)
        if value is not None and value > max_logprobs:
            raise ValueError(f"{name} must be in [0, {max_logprobs}], got {value}")
    if values.get("top_k", 0) < 0:
        values["top_k"] = 0  # vLLM: -1 disables
    values["stop_token_ids"] = list(values["stop_token_ids"])
    values["allowed_token_ids"] = list(values["allowed_token_ids"])
    values["bad_words"] = list(values["bad_words"])
    return SamplingParams(**values)


def prompt_from_pb(ids) -> list[int]:
    prompt = list(ids)
    if not prompt:
        raise ValueError("prompt_token_ids is empty")
    return prompt


def logprobs_to_pb(logprobs: list[TokenLogprob] | None) -> list[common_pb2.TokenLogprobs]:
    return [token_logprobs_to_pb(lp.logprob, lp.top, lp.rank) for lp in (logprobs or [])]


def chunk_from_output(out: RequestOutput, num_completion_tokens: int) -> worker_pb2.DecodeChunk:
    """One DecodeChunk per engine output; the last one carries finish_reason and usage."""
    chunk = worker_pb2.DecodeChunk(
        token_ids=out.new_token_ids,
        logprobs=logprobs_to_pb(out.new_logprobs),
        prompt_logprobs=logprobs_to_pb(out.prompt_logprobs),  # prefilled here: first chunk
    )
    if out.finished:
        chunk.finish_reason = finish_reason_to_pb(out.finish_reason)
        chunk.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=num_completion_tokens,
                cached_prompt_tokens=out.num_cached_tokens,
            )
        )
    return chunk


def queue_depth(snap: WorkerSnapshot) -> int:
    """Requests accepted and not finished. Every one of them is an active call (a prefill, or a
    decode stream, imports still pulling included) and most are also in the engine's running
    or waiting queue: counted once, not once per place (adding them reported 2 for 1)."""
    return max(snap.num_active, snap.stats.num_running + snap.stats.num_waiting)


def load_report(
    snap: WorkerSnapshot, identity: WorkerIdentity, role: str, serving: bool
) -> common_pb2.LoadReport:
    stats = snap.stats
    return common_pb2.LoadReport(
        engine_id=identity.engine_id,
        epoch=identity.epoch,
        role=role,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        queue_depth=queue_depth(snap),
        kv_cache_usage=stats.kv_cache_usage,
        num_free_blocks=stats.num_free_blocks,
        num_blocks=stats.num_blocks,
        num_held=snap.num_held,
        num_preemptions=stats.num_preemptions,
        serving=serving,
        kv_transfer_bytes_total=snap.kv_transfer_bytes_total,
        kv_transfer_seconds_total=snap.kv_transfer_seconds_total,
        block_size=snap.block_size,
        prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits,
        queue_time_bucket_counts=stats.queue_time.counts,
        queue_time_sum=stats.queue_time.sum,
        iteration_tokens_bucket_counts=stats.iteration_tokens.counts,
        iteration_tokens_sum=stats.iteration_tokens.sum,
        **_spec_decode_fields(stats),
    )


def _spec_decode_fields(stats) -> dict:
    spec = stats.spec_decode
    if spec is None:
        return {}
    return dict(
        spec_decode_num_drafts=spec.num_drafts,
        spec_decode_num_draft_tokens=spec.num_draft_tokens,
        spec_decode_num_accepted_tokens=spec.num_accepted_tokens,
        spec_decode_num_emitted_tokens=spec.num_emitted_tokens,
        spec_decode_num_accepted_tokens_per_pos=list(spec.accepted_per_pos),
    )


_EVENT_KIND_PB = {
    KVEventKind.STORED: common_pb2.KV_EVENT_KIND_STORED,
    KVEventKind.REMOVED: common_pb2.KV_EVENT_KIND_REMOVED,
    KVEventKind.CLEARED: common_pb2.KV_EVENT_KIND_CLEARED,
}


def kv_events_to_pb(
    read: KVEventsRead, identity: WorkerIdentity, block_size: int
) -> common_pb2.KVEventsResponse:
    response = common_pb2.KVEventsResponse(
        engine_id=identity.engine_id,
        epoch=identity.epoch,
        block_size=block_size,
        last_seq=read.last_seq,
        is_snapshot=read.snapshot is not None,
        snapshot_hashes=sorted(read.snapshot or ()),
    )
    for event in read.events:
        response.events.add(
            seq=event.seq, kind=_EVENT_KIND_PB[event.kind], block_hashes=event.block_hashes
        )
    return response


def debug_state(snap: WorkerSnapshot) -> common_pb2.DebugState:
    stats = snap.stats
    return common_pb2.DebugState(
        num_free_blocks=stats.num_free_blocks,
        num_blocks=stats.num_blocks,
        num_held_leases=len(snap.held_transfer_ids),
        held_transfer_ids=snap.held_transfer_ids,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_pending_imports=stats.num_reserved,
        num_shm_segments=snap.num_shm_segments,
        num_active_streams=snap.num_active,
    )
