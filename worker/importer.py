"""Bringing a prompt's KV from a prefill worker into the local pool.

    reserve_import -> pull the blocks not already cached here -> release the lease on P
                   -> commit_import (the request joins the running batch with its first token)

Invariant: the reserved blocks are written only while reserved, and given back (abort) only
once no thread writes them any more -- a cancelled pull waits for its copy in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from engine.engine_loop import EngineLoop, RequestStream
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from kvtransfer.client import KVTransferClient, PullResult
from kvtransfer.exporter import KVExporter, ReadRequest
from kvtransfer.handle import HANDLE_KEY_PURPOSE, KVHandle, verify_handle
from kvtransfer.layout import IncompatibleLayoutError
from kvtransfer.pages import PagedKV
from kvtransfer.transport import finish_even_if_cancelled
from rpc.auth import ClusterSecret, cluster_token_interceptors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImportCall:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    handle: KVHandle
    deadline: float | None = None  # time.monotonic() seconds


class PeerClients:
    """One KV client (a channel) per prefill endpoint, at most `capacity` of them open.

    Endpoints come and go (a restarted pod has a new address), so the least recently used
    client is retired when a new one would exceed the cap; a retired client is closed once the
    pulls running on it have finished, never under them.
    """

    def __init__(self, make: Callable[[str], KVTransferClient], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._make = make
        self._capacity = capacity
        self._open: OrderedDict[str, KVTransferClient] = OrderedDict()
        self._users: Counter[int] = Counter()  # id(client) -> pulls/releases running on it
        self._retired: dict[int, KVTransferClient] = {}
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._open)

    @asynccontextmanager
    async def use(self, endpoint: str):
        client = self._open.get(endpoint)
        if client is not None:
            self._open.move_to_end(endpoint)
        else:
            client = self._open[endpoint] = self._make(endpoint)
            while len(self._open) > self._capacity:
                _, old = self._open.popitem(last=False)
                self._retired[id(old)] = old
                self._close_if_idle(old)
        self._users[id(client)] += 1
        try:
            yield client
        finally:
            self._users[id(client)] -= 1
            self._close_if_idle(client)

    def _close_if_idle(self, client: KVTransferClient) -> None:
        if id(client) in self._retired and self._users[id(client)] <= 0:
            del self._retired[id(client)], self._users[id(client)]
            task = asyncio.get_running_loop().create_task(client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for client in [*self._open.values(), *self._retired.values()]:
            await client.close()
        self._open.clear()
        self._retired.clear()
        if self._closing:
            await asyncio.wait(self._closing, timeout=5)


MAX_PEER_CLIENTS = 64  # prefill endpoints a decode worker keeps a channel open to


class KVImporter:
    def __init__(
        self,
        engine_loop: EngineLoop,
        paged: PagedKV,
        *,
        local_host_id: str,
        transport: str,
        credentials: grpc.ChannelCredentials | None,
        max_chunk_bytes: int,
        local_exporter: KVExporter | None = None,
        cluster_secret: ClusterSecret | None = None,
    ) -> None:
        self._loop = engine_loop
        self._local = local_exporter  # our own prefill role's blocks (a `both` worker)
        self._paged = paged
        self._host_id = local_host_id
        self._transport = transport
        self._credentials = credentials
        self._max_chunk_bytes = max_chunk_bytes
        self._interceptors = cluster_token_interceptors(cluster_secret)
        self._handle_key = cluster_secret.derive(HANDLE_KEY_PURPOSE) if cluster_secret else None
        self._clients = PeerClients(self._new_client, MAX_PEER_CLIENTS)
        self._background: set[asyncio.Task] = set()
        self.bytes_pulled = 0
        self.seconds_pulling = 0.0
        self.pulls_by_transport: dict[str, int] = {}

    async def import_kv(self, call: ImportCall, stream: RequestStream) -> PullResult | None:
        """Reserve, pull, commit. On any failure or cancellation the reservation is freed and the
        lease on the prefill worker released. Returns the pull's stats (None: all cached here)."""
        handle = call.handle
        self._check_handle(call)
        reserving = self._loop.reserve_import(call.request_id, call.prompt_token_ids, call.params)
        committed = released = False
        try:
            # Inside the try: cancelled while the engine thread reserves, the blocks are ours
            # already and only the abort below gives them back.
            reservation = await asyncio.wrap_future(reserving)
            n = len(reservation.block_ids)
            if len(handle.block_ids) < n:
                raise ValueError(f"KV handle has {len(handle.block_ids)} blocks, prompt needs {n}")
            skip = reservation.num_cached_blocks
            result = None
            if skip < n:
                result = await self._pull(
                    call, list(handle.block_ids[skip:n]), reservation.block_ids[skip:]
                )
            self._release_later(handle)
            released = True
            first_logprob = None
            if call.params.logprobs is not None:
                first_logprob = TokenLogprob(
                    handle.first_logprob or 0.0, handle.first_top_logprobs or {}
                )
            await asyncio.wrap_future(
                self._loop.commit_import(call.request_id, handle.first_token, first_logprob, stream)
            )
            committed = True
            log.info(
                "kv imported request_id=%s transfer_id=%s blocks=%d cached=%d transport=%s "
                "bytes=%d ms=%.1f",
                call.request_id, handle.transfer_id, n, skip,
                result.transport if result else "-", result.num_bytes if result else 0,
                result.seconds * 1000 if result else 0.0,
            )  # fmt: skip
            return result
        finally:
            if not committed:
                # abort (not cancel_import): a commit queued before a cancellation may have run.
                self._loop.abort(call.request_id)
            if not released:
                self._release_later(handle)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        await self._clients.close()

    def _check_handle(self, call: ImportCall) -> None:
        """Before anything is reserved or dialed: signed by a trusted prefill worker, unexpired,
        and matching this prompt and this worker's layout."""
        handle = call.handle
        if self._handle_key is not None:
            verify_handle(handle, self._handle_key)
        if handle.num_tokens != len(call.prompt_token_ids):
            raise ValueError(
                f"KV handle covers {handle.num_tokens} tokens, the prompt has "
                f"{len(call.prompt_token_ids)}"
            )
        local = self._paged.layout.compat_hash()
        if handle.compat_hash != local:
            raise IncompatibleLayoutError(
                f"KV handle from {handle.engine_id} has compatibility hash {handle.compat_hash!r}, "
                f"this worker's is {local!r} (different model, dtype or block size)"
            )

    async def _pull(self, call: ImportCall, src: list[int], dst: list[int]) -> PullResult:
        handle = call.handle
        if self._is_local(handle):
            return await self._copy_local(handle, src, dst)
        async with self._clients.use(handle.kv_endpoint) as client:
            keepalive = asyncio.create_task(self._keep_lease(client, handle))
            try:
                timeout = (
                    None if call.deadline is None else max(0.001, call.deadline - time.monotonic())
                )
                result = await client.pull(
                    handle.transfer_id, handle.epoch, src, dst, timeout=timeout
                )
            finally:
                keepalive.cancel()
        self.bytes_pulled += result.num_bytes
        self.seconds_pulling += result.seconds
        n = self.pulls_by_transport.get(result.transport, 0)
        self.pulls_by_transport[result.transport] = n + 1
        return result

    def _is_local(self, handle: KVHandle) -> bool:
        return self._local is not None and handle.engine_id == self._local.identity.engine_id

    async def _copy_local(self, handle: KVHandle, src: list[int], dst: list[int]) -> PullResult:
        """A handle our own prefill role issued: the pages are in this pool already, so they are
        copied block to block under the pinned lease (same checks as a remote read)."""
        exporter = self._local
        assert exporter is not None
        request = ReadRequest(handle.transfer_id, tuple(src), (), handle.epoch, handle.compat_hash)
        start = time.perf_counter()

        def copy() -> int:
            with exporter.open_read(request) as plan:
                pages = self._paged.gather(plan.layers, plan.block_ids)
                self._paged.scatter(plan.layers, dst, pages)
                return pages.numel()

        moved = await finish_even_if_cancelled(copy)
        result = PullResult("local", moved, time.perf_counter() - start)
        self.bytes_pulled += result.num_bytes
        self.seconds_pulling += result.seconds
        self.pulls_by_transport["local"] = self.pulls_by_transport.get("local", 0) + 1
        return result

    async def _keep_lease(self, client: KVTransferClient, handle: KVHandle) -> None:
        """Extend the lease while a pull runs (every half lease)."""
        lease_ms = max(handle.lease_ms, 100)
        try:
            while True:
                await asyncio.sleep(lease_ms / 2000)
                await client.extend(handle.transfer_id, lease_ms)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the pull itself reports what matters
            log.debug("lease keepalive stopped transfer_id=%s: %s", handle.transfer_id, exc)

    def _release_later(self, handle: KVHandle) -> None:
        """Tell P to free the blocks, without holding up the request."""
        task = asyncio.create_task(self._release(handle))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, handle: KVHandle) -> None:
        if self._is_local(handle):
            assert self._local is not None
            released = self._local.leases.release(handle.transfer_id)
            log.info("kv lease released transfer_id=%s released=%s", handle.transfer_id, released)
            return
        try:
            async with self._clients.use(handle.kv_endpoint) as client:
                released = await client.release(handle.transfer_id)
            log.info("kv lease released transfer_id=%s released=%s", handle.transfer_id, released)
        except Exception as exc:
            log.warning("kv release failed transfer_id=%s: %s", handle.transfer_id, exc)

    def _new_client(self, endpoint: str) -> KVTransferClient:
        return KVTransferClient(
            endpoint,
            self._paged,
            local_host_id=self._host_id,
            transport=self._transport,
            credentials=self._credentials,
            max_chunk_bytes=self._max_chunk_bytes,
            interceptors=self._interceptors,
        )
