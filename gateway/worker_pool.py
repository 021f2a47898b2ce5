"""The workers behind the gateway: membership, health, load, KV events, and routing.

Membership comes from `Discovery` (static addresses and DNS names), refreshed on every poll:
a new address becomes a worker, a vanished one is dropped (its channel closes once this
gateway's requests on it end). Every worker is polled with GetLoad; a poll or a request that
fails with UNAVAILABLE marks it unhealthy (and forgets its prefix-index entry) until a later poll
succeeds. With the kv-aware router the prefill workers are also asked for their KV events.
Between polls the gateway counts what it sent a worker itself, so a burst of requests does not
all land on the worker that looked idlest.

`pick` / `pick_prefill` choose through the router among healthy workers and book the request;
`mark_failed` is the one place a worker is declared unavailable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from gateway.discovery import Discovery, Resolver, parse_entries, resolve_dns
from gateway.prefix_index import PrefixIndex
from gateway.router import DEFAULT_ROUTER, Choice, Route, make_router
from gateway.worker_client import WorkerClient, WorkerRpcError
from gateway.worker_state import DECODE, PREFILL, Worker

__all__ = ["DECODE", "PREFILL", "Worker", "WorkerPool"]
log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(
        self,
        prefill_addresses: Sequence[str],
        decode_addresses: Sequence[str],
        poll_timeout_s: float,
        client_factory: Callable[[str], WorkerClient] = WorkerClient,
        router: str = DEFAULT_ROUTER,
        resolver: Resolver = resolve_dns,
    ) -> None:
        self._poll_timeout_s = poll_timeout_s
        self._client_factory = client_factory
        self._discovery = {
            PREFILL: Discovery(parse_entries(prefill_addresses, "--prefill"), resolver),
            DECODE: Discovery(parse_entries(decode_addresses, "--decode"), resolver),
        }
        self.router_name = router
        self.index = PrefixIndex()
        self.router = make_router(router, self.index)
        self.workers: list[Worker] = []
        self._retired: list[Worker] = []  # left the pool, channel open until requests end
        for role, discovery in self._discovery.items():
            self._sync(role, discovery.static_addresses())

    # -- reading ---------------------------------------------------------------------------------

    def of_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role]

    def healthy(self, role: str) -> list[Worker]:
        return [w for w in self.of_role(role) if w.healthy]

    # -- routing ---------------------------------------------------------------------------------

    def pick(
        self, role: str, route: Route | None = None, exclude: Sequence[Worker] = ()
    ) -> Worker | None:
        """The router's choice among healthy workers of `role`, counted as sent one more."""
        choice = self._choose(role, route or Route(()), exclude)
        return None if choice is None else choice.worker

    def pick_prefill(self, route: Route, exclude: Sequence[Worker] = ()) -> Choice | None:
        """Like `pick(PREFILL)`, also booking the prompt tokens the worker will compute;
        hand the choice back to `prefill_done` when the call ends, however it ends."""
        choice = self._choose(PREFILL, route, exclude)
        if choice is not None:
            choice.worker.pending_prefill_tokens += choice.prefill_tokens
        return choice

    def prefill_done(self, choice: Choice) -> None:
        choice.worker.pending_prefill_tokens -= choice.prefill_tokens
        if choice.noted_hashes:
            self.index.note_done(choice.worker.address, choice.noted_hashes)

    def _choose(self, role: str, route: Route, exclude: Sequence[Worker]) -> Choice | None:
        candidates = [w for w in self.healthy(role) if w not in exclude]
        if not candidates:
            return None
        choice = self.router.choose(role, candidates, route)
        choice.worker.sent_since_report += 1
        return choice

    def mark_failed(self, worker: Worker, reason: str) -> None:
        """The worker is unavailable: no more routing to it, nor trust in its cache contents,
        until a poll finds it serving again."""
        if worker.healthy:
            log.warning("%s worker %s is unhealthy: %s", worker.role, worker.address, reason)
        worker.healthy = False
        worker.last_error = reason
        self.index.forget(worker.address)

    # -- membership and polling ------------------------------------------------------------------

    async def poll_once(self) -> None:
        await self.refresh_members()
        await asyncio.gather(*(self._poll(w) for w in self.workers))
        if self.router_name == "kv-aware":
            await asyncio.gather(*(self._poll_events(w) for w in self.healthy(PREFILL)))
        self.index.prune()
        await self._close_retired()

    async def refresh_members(self) -> None:
        for role, discovery in self._discovery.items():
            if discovery.has_dns:
                self._sync(role, await discovery.addresses())

    def _sync(self, role: str, addresses: Sequence[str]) -> None:
        current = {w.address: w for w in self.of_role(role)}
        for address in addresses:
            if address not in current:
                log.info("%s worker %s joined", role, address)
                self.workers.append(Worker(address, role, self._client_factory(address)))
        for address, worker in current.items():
            if address not in addresses:
                log.info("%s worker %s left", role, address)
                self.workers.remove(worker)
                self.index.forget(address)
                worker.healthy = False
                self._retired.append(worker)

    async def _close_retired(self) -> None:
        done = [w for w in self._retired if w.in_flight == 0]
        self._retired = [w for w in self._retired if w.in_flight > 0]
        await asyncio.gather(*(w.client.close() for w in done))

    async def close(self) -> None:
        everyone = self.workers + self._retired
        await asyncio.gather(*(w.client.close() for w in everyone))

    async def _poll(self, worker: Worker) -> None:
        try:
            load = await worker.client.get_load(worker.role, self._poll_timeout_s)
        except WorkerRpcError as exc:
            self.mark_failed(worker, f"GetLoad: {exc.code.name}: {exc.details}")
            return
        if not worker.healthy and load.serving:
            log.info("%s worker %s is healthy", worker.role, worker.address)
        worker.load = load
        worker.foreign_load = max(0, load.queue_depth - worker.in_flight)  # other gateways'
        worker.sent_since_report = 0
        worker.healthy = load.serving
        worker.last_error = None if load.serving else "draining"

    async def _poll_events(self, worker: Worker) -> None:
        cursor = self.index.cursor(worker.address)
        try:
            update = await worker.client.get_kv_events(worker.role, cursor, self._poll_timeout_s)
        except WorkerRpcError as exc:
            # An older worker without KV events, or a blip: route it by load alone for now.
            log.debug("GetKVEvents on %s failed: %s", worker.address, exc)
            self.index.forget(worker.address)
            return
        if worker in self.workers and worker.healthy:  # it may have left while we waited
            self.index.apply(worker.address, update)
