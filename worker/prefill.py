"""The prefill worker: runs prompts (batched by the engine loop), holds their KV blocks under
leases, and serves those blocks to decode workers through the KVTransferService.

Protobuf-free: `servicer.py` converts. One asyncio event loop runs the gRPC server; the engine
runs on its own thread (EngineLoop).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

from engine.engine import EngineStats, LLMEngine
from engine.engine_loop import EngineLoop, RequestStream
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from kvtransfer.exporter import KVExporter, WorkerIdentity
from kvtransfer.handle import HANDLE_KEY_PURPOSE, KVHandle, sign_handle
from kvtransfer.layout import KVLayout
from kvtransfer.lease import FreeReason, Lease, LeaseConfig, LeaseTable
from kvtransfer.pages import PagedKV
from kvtransfer.shm import ShmExporter, shm_available
from worker.config import PrefillWorkerConfig
from worker.errors import WorkerDrainingError
from worker.identity import new_identity
from worker.snapshot import WorkerSnapshot

log = logging.getLogger(__name__)

FREED_SENTINEL_BYTE = 0xFF  # float32/bf16/fp16: NaN in every element


@dataclass(frozen=True, slots=True)
class PrefillCall:
    transfer_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    lease_ms: int | None = None

    def __post_init__(self) -> None:
        if not self.transfer_id:
            raise ValueError("transfer_id is empty")
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids is empty")


@dataclass(frozen=True, slots=True)
class PrefillOutcome:
    handle: KVHandle
    num_prompt_tokens: int
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None  # with params.prompt_logprobs


class PrefillWorker:
    role = "prefill"

    def __init__(
        self,
        engine: LLMEngine,
        config: PrefillWorkerConfig,
        *,
        engine_loop: EngineLoop | None = None,
        identity: WorkerIdentity | None = None,
    ) -> None:
        """`engine_loop`/`identity` given: shared with a decode role on the same engine (`both`);
        whoever made the loop starts and stops it."""
        if config.fill_freed_kv and engine.config.enable_prefix_caching:
            raise ValueError(
                "fill_freed_kv overwrites freed blocks, which the prefix cache may share: "
                "use it with prefix caching disabled"
            )
        self.config = config
        self._owns_loop = engine_loop is None
        self.engine_loop = engine_loop or EngineLoop(engine, name="prefill-engine")
        self.identity = identity or new_identity(self.role, config.engine_id)
        layout = KVLayout.from_spec(engine.kv_spec, engine.model_fingerprint)
        self.paged = PagedKV(engine.kv_cache, layout)
        self.leases = LeaseTable(
            self._free_lease, LeaseConfig(config.lease_ms, config.max_lease_ms)
        )
        shm = ShmExporter() if config.enable_shm and shm_available() else None
        self.exporter = KVExporter(self.paged, self.leases, self.identity, shm)
        self.kv_endpoint = config.advertise_address or ""
        secret = config.cluster_secret
        self._handle_key = secret.derive(HANDLE_KEY_PURPOSE) if secret else None
        self.serving = False
        self._active = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, bound_host: str, bound_port: int) -> None:
        if not self.kv_endpoint:
            host = socket.gethostname() if bound_host in ("0.0.0.0", "::", "[::]") else bound_host
            self.kv_endpoint = f"{host}:{bound_port}"
        if self._owns_loop:
            self.engine_loop.start()
        self.leases.start_reaper()
        self.serving = True
        log.info(
            "prefill worker ready engine_id=%s epoch=%d kv_endpoint=%s shm=%s",
            self.identity.engine_id,
            self.identity.epoch,
            self.kv_endpoint,
            self.exporter.shm is not None,
        )

    async def drain(self, timeout_s: float) -> None:
        """Stop taking prompts; wait for running prefills and open leases (up to timeout)."""
        self.serving = False
        deadline = time.monotonic() + timeout_s
        while (self._active or len(self.leases)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("prefill worker drained active=%d leases=%d", self._active, len(self.leases))

    async def close(self) -> None:
        self.leases.close()  # frees every remaining lease (while the engine loop still runs)
        if self._owns_loop:
            self.engine_loop.stop()
        if self.exporter.shm is not None:
            self.exporter.shm.close()

    # -- requests ------------------------------------------------------------------------------

    async def prefill(self, call: PrefillCall) -> PrefillOutcome:
        if not self.serving:
            raise WorkerDrainingError("prefill worker is draining")
        start = time.perf_counter()
        self._active += 1
        try:
            out = await self._run_prompt(call)
        finally:
            self._active -= 1
        outcome = self._grant(call, out)
        log.info(
            "prefill done request_id=%s transfer_id=%s prompt_tokens=%d cached=%d blocks=%d "
            "first_token=%d ms=%.1f",
            call.request_id, call.transfer_id, outcome.num_prompt_tokens,
            outcome.num_cached_tokens, len(outcome.handle.block_ids),
            outcome.handle.first_token, (time.perf_counter() - start) * 1000,
        )  # fmt: skip
        return outcome

    def release(self, transfer_id: str) -> bool:
        released = self.leases.release(transfer_id)
        log.info("release transfer_id=%s released=%s", transfer_id, released)
        return released

    def load_snapshot(self) -> WorkerSnapshot:
        """Like debug_snapshot, from the engine's latest published stats: never waits on a step."""
        return self._snapshot(self.engine_loop.latest_stats)

    async def debug_snapshot(self) -> WorkerSnapshot:
        return self._snapshot(await asyncio.wrap_future(self.engine_loop.stats()))

    def _snapshot(self, stats: EngineStats) -> WorkerSnapshot:
        held = tuple(self.leases.transfer_ids())
        shm = len(self.exporter.shm) if self.exporter.shm is not None else 0
        block_size = self.engine_loop.engine.config.block_size
        return WorkerSnapshot(stats, self._active, len(held), held, shm, block_size=block_size)

    # -- internals -----------------------------------------------------------------------------

    async def _run_prompt(self, call: PrefillCall) -> RequestOutput:
        stream = RequestStream(asyncio.get_running_loop())
        added = self.engine_loop.add_request(
            call.transfer_id, call.prompt_token_ids, call.params, stream, prefill_only=True
        )
        try:
            # A cancellation while the add is on the engine thread must abort too: the request
            # is in the engine by then and would keep its blocks held with no lease to free them.
            await asyncio.wrap_future(added)
            out = await stream.get()
        except asyncio.CancelledError:
            # Client gone or deadline passed: the engine frees the blocks, held or not (the abort
            # runs after the add on the engine thread; an add that never ran makes it a no-op).
            self.engine_loop.abort(call.transfer_id)
            log.info(
                "prefill cancelled request_id=%s transfer_id=%s", call.request_id, call.transfer_id
            )
            raise
        if out.prefill is None:
            self.engine_loop.abort(call.transfer_id)
            raise RuntimeError(
                f"prefill ended without a result (finish_reason={out.finish_reason})"
            )
        return out

    def _grant(self, call: PrefillCall, out: RequestOutput) -> PrefillOutcome:
        assert out.prefill is not None
        result = out.prefill
        try:
            lease = self.leases.grant(
                call.transfer_id, result.block_ids, call.lease_ms, owner=call.transfer_id
            )
        except Exception:
            self.engine_loop.release_held(call.transfer_id)
            raise
        top = out.new_logprobs[0].top if out.new_logprobs else None
        handle = KVHandle(
            engine_id=self.identity.engine_id,
            epoch=self.identity.epoch,
            kv_endpoint=self.kv_endpoint,
            transfer_id=call.transfer_id,
            block_ids=tuple(result.block_ids),
            num_tokens=result.num_prompt_tokens,
            first_token=result.first_token,
            first_logprob=result.first_logprob,
            first_top_logprobs=top,
            lease_ms=self._lease_ms_left(lease),
            compat_hash=self.exporter.compat_hash,
            host_id=self.identity.host_id,
        )
        if self._handle_key is not None:
            handle = sign_handle(handle, self._handle_key, handle.lease_ms)
        return PrefillOutcome(
            handle, result.num_prompt_tokens, out.num_cached_tokens, out.prompt_logprobs
        )

    def _lease_ms_left(self, lease: Lease) -> int:
        return max(0, int((lease.expires_at - time.monotonic()) * 1000))

    def _free_lease(self, lease: Lease, reason: FreeReason) -> None:
        """LeaseTable callback (any thread): give the blocks back to the engine."""
        self.exporter.drop_attachments(lease)
        fill = self.config.fill_freed_kv
        block_ids = list(lease.block_ids)

        def free(engine: LLMEngine) -> None:
            if fill:  # still held here, so the engine is not using these blocks
                self.paged.fill(block_ids, FREED_SENTINEL_BYTE)
            engine.release_held(lease.owner)

        future = self.engine_loop.call(free)
        future.add_done_callback(_log_failure(f"release_held transfer_id={lease.transfer_id}"))
        log.info(
            "lease freed transfer_id=%s reason=%s blocks=%d",
            lease.transfer_id, reason.value, len(block_ids),
        )  # fmt: skip


def _log_failure(what: str):
    def callback(future) -> None:
        exc = future.exception()
        if exc is not None:
            log.error("%s failed: %s", what, exc)

    return callback
