"""protobuf <-> engine objects for the worker services (both roles)."""

from __future__ import annotations

from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from kvtransfer.exporter import WorkerIdentity
from kvtransfer.wire import token_logprobs_to_pb
from protos.pdserve.v1 import common_pb2, worker_pb2
from worker.snapshot import WorkerSnapshot

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}

# proto field -> engine field, for the `optional` scalars copied as they are.
_SCALARS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "logprobs",
)


def sampling_params_from_pb(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unset fields keep the engine's defaults. Raises ValueError on invalid values."""
    values: dict[str, object] = {
        name: getattr(msg, name) for name in _SCALARS if msg.HasField(name)
    }
    if "top_k" in values and values["top_k"] < 0:  # type: ignore[operator]
        values["top_k"] = 0  # vLLM: -1 disables
    values["stop_token_ids"] = list(msg.stop_token_ids)
    return SamplingParams(**values)  # type: ignore[arg-type]


def prompt_from_pb(ids) -> list[int]:
    prompt = list(ids)
    if not prompt:
        raise ValueError("prompt_token_ids is empty")
    return prompt


def logprobs_to_pb(logprobs: list[TokenLogprob] | None) -> list[common_pb2.TokenLogprobs]:
    return [token_logprobs_to_pb(lp, top) for lp, top in (logprobs or [])]


def chunk_from_output(out: RequestOutput, num_completion_tokens: int) -> worker_pb2.DecodeChunk:
    """One DecodeChunk per engine output; the last one carries finish_reason and usage."""
    chunk = worker_pb2.DecodeChunk(
        token_ids=out.new_token_ids, logprobs=logprobs_to_pb(out.new_logprobs)
    )
    if out.finished:
        chunk.finish_reason = FINISH_REASONS.get(out.finish_reason, common_pb2.FINISH_REASON_ABORT)
        chunk.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=num_completion_tokens,
                cached_prompt_tokens=out.num_cached_tokens,
            )
        )
    return chunk


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
        queue_depth=stats.num_running + stats.num_waiting + snap.num_active,
        kv_cache_usage=stats.kv_cache_usage,
        num_free_blocks=stats.num_free_blocks,
        num_blocks=stats.num_blocks,
        num_held=snap.num_held,
        num_preemptions=stats.num_preemptions,
        serving=serving,
        kv_transfer_bytes_total=snap.kv_transfer_bytes_total,
        kv_transfer_seconds_total=snap.kv_transfer_seconds_total,
    )


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
