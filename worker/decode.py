"""The decode worker: admits requests with imported KV (or prefills them locally) and streams
their tokens. Protobuf-free: `servicer.py` converts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.engine import EngineStats, LLMEngine
from engine.engine_loop import EngineLoop, RequestStream
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kvtransfer.exporter import KVExporter, WorkerIdentity
from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout
from kvtransfer.pages import PagedKV
from rpc.channel import channel_credentials
from worker.config import DecodeWorkerConfig
from worker.errors import WorkerDrainingError
from worker.identity import new_identity
from worker.importer import ImportCall, KVImporter
from worker.snapshot import WorkerSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DecodeCall:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    handle: KVHandle | None = None  # None: prefill locally
    deadline: float | None = None  # time.monotonic() seconds

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id is empty")
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids is empty")


@dataclass(slots=True)
class _Active:
    aborted: bool = False
    committed: bool = False  # the engine owns the request (added or import committed)
    task: asyncio.Task | None = None  # the import in progress, if any


class DecodeWorker:
    role = "decode"

    def __init__(
        self,
        engine: LLMEngine,
        config: DecodeWorkerConfig,
        *,
        engine_loop: EngineLoop | None = None,
        identity: WorkerIdentity | None = None,
        local_exporter: KVExporter | None = None,
    ) -> None:
        """`engine_loop`/`identity`/`local_exporter` given: the decode role of a `both` worker,
        sharing the engine with its prefill role; handles that role issued are copied in-process
        instead of pulled. Whoever made the loop starts and stops it."""
        self.config = config
        self._owns_loop = engine_loop is None
        self.engine_loop = engine_loop or EngineLoop(
            engine, name="decode-engine", step_delay_s=config.step_delay_ms / 1000
        )
        self.identity = identity or new_identity(self.role, config.engine_id)
        layout = KVLayout.from_spec(engine.kv_spec, engine.model_fingerprint)
        self.paged = PagedKV(engine.kv_cache, layout)
        self.importer = KVImporter(
            self.engine_loop,
            self.paged,
            local_host_id=self.identity.host_id,
            transport=config.kv_transport,
            credentials=channel_credentials(
                config.peer_tls_ca, config.peer_tls_cert, config.peer_tls_key
            ),
            max_chunk_bytes=config.max_chunk_bytes,
            local_exporter=local_exporter,
            cluster_secret=config.cluster_secret,
        )
        self.serving = False
        self._active: dict[str, _Active] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._owns_loop:
            self.engine_loop.start()
        self.serving = True
        log.info(
            "decode worker ready engine_id=%s transport=%s",
            self.identity.engine_id,
            self.config.kv_transport,
        )

    async def drain(self, timeout_s: float) -> None:
        self.serving = False
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("decode worker drained active=%d", len(self._active))

    async def close(self) -> None:
        await self.importer.close()
        if self._owns_loop:
            self.engine_loop.stop()

    # -- requests ------------------------------------------------------------------------------

    async def decode(self, call: DecodeCall) -> AsyncIterator[RequestOutput]:
        """The request's outputs until the finished one. Closing the iterator early (client
        cancel, deadline) aborts the request and frees its blocks."""
        if not self.serving:
            raise WorkerDrainingError("decode worker is draining")
        if call.request_id in self._active:
            raise ValueError(f"request id {call.request_id!r} is already in use")
        active = self._active[call.request_id] = _Active()
        stream = RequestStream(asyncio.get_running_loop())
        start = time.perf_counter()
        try:
            if not await self._admit(call, stream, active):
                yield _aborted(call)
                return
            async for out in stream:
                yield out
            log.info(
                "decode done request_id=%s reason=%s ms=%.1f",
                call.request_id, out.finish_reason, (time.perf_counter() - start) * 1000,
            )  # fmt: skip
        finally:
            del self._active[call.request_id]
            if active.committed and not stream.finished:
                self.engine_loop.abort(call.request_id)
                log.info("decode cancelled request_id=%s", call.request_id)

    async def abort(self, request_id: str) -> bool:
        active = self._active.get(request_id)
        if active is None or active.aborted:
            return False
        active.aborted = True
        if active.task is not None:
            active.task.cancel()  # the import frees its reservation itself
        if active.committed:
            await asyncio.wrap_future(self.engine_loop.abort(request_id))
        log.info("abort request_id=%s", request_id)
        return True

    def load_snapshot(self) -> WorkerSnapshot:
        """Like debug_snapshot, from the engine's latest published stats: never waits on a step."""
        return self._snapshot(self.engine_loop.latest_stats)

    async def debug_snapshot(self) -> WorkerSnapshot:
        return self._snapshot(await asyncio.wrap_future(self.engine_loop.stats()))

    def _snapshot(self, stats: EngineStats) -> WorkerSnapshot:
        return WorkerSnapshot(
            stats,
            len(self._active),
            stats.num_reserved,
            kv_transfer_bytes_total=self.importer.bytes_pulled,
            kv_transfer_seconds_total=self.importer.seconds_pulling,
            block_size=self.engine_loop.engine.config.block_size,
        )

    # -- internals -----------------------------------------------------------------------------

    async def _admit(self, call: DecodeCall, stream: RequestStream, active: _Active) -> bool:
        """Put the request into the engine; False if it was aborted first."""
        if call.handle is None:
            added = self.engine_loop.add_request(
                call.request_id, call.prompt_token_ids, call.params, stream
            )
            # Committed before the await: cancelled while the engine thread adds it, the request
            # is in the engine and only the abort in decode()'s clean-up takes it out.
            active.committed = True
            await asyncio.wrap_future(added)
            log.info("decode admitted request_id=%s local_prefill=1", call.request_id)
            return True
        icall = ImportCall(
            call.request_id, call.prompt_token_ids, call.params, call.handle, call.deadline
        )
        active.task = asyncio.ensure_future(self.importer.import_kv(icall, stream))
        try:
            await active.task
        except asyncio.CancelledError:
            if active.aborted and not _current_task_cancelling():
                return False
            raise
        finally:
            active.task = None
        active.committed = True
        if active.aborted:  # raced with the commit: the stream ends with the "abort" output
            await asyncio.wrap_future(self.engine_loop.abort(call.request_id))
        return True


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _aborted(call: DecodeCall) -> RequestOutput:
    return RequestOutput(
        request_id=call.request_id,
        new_token_ids=[],
        new_logprobs=None,
        finished=True,
        finish_reason="abort",
        num_prompt_tokens=len(call.prompt_token_ids),
    )
