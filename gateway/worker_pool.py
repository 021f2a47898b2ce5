"""The workers behind the gateway: health, load, and least-loaded picking.

Every worker is polled with GetLoad; a poll or a request that fails with UNAVAILABLE marks it
unhealthy until a later poll succeeds. Between polls the gateway counts what it sent a worker
itself, so a burst of requests does not all land on the worker that looked idlest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.worker_client import LoadSnapshot, WorkerClient, WorkerRpcError

log = logging.getLogger(__name__)
PREFILL = "prefill"
DECODE = "decode"


@dataclass(slots=True)
class Worker:
    address: str
    role: str  # PREFILL or DECODE
    client: WorkerClient
    healthy: bool = False
    load: LoadSnapshot | None = None
    sent_since_report: int = 0  # requests routed here since `load` was taken
    in_flight: int = 0  # this gateway's requests on the worker now
    last_error: str | None = None

    def score(self) -> tuple[int, float, str]:
        """Lower is better: queue depth (reported + sent since), then KV usage."""
        depth = self.load.queue_depth if self.load else 0
        usage = self.load.kv_cache_usage if self.load else 0.0
        return (depth + self.sent_since_report, usage, self.address)


class WorkerPool:
    def __init__(
        self,
        prefill_addresses: Sequence[str],
        decode_addresses: Sequence[str],
        poll_timeout_s: float,
        client_factory: Callable[[str], WorkerClient] = WorkerClient,
    ) -> None:
        self._poll_timeout_s = poll_timeout_s
        self.workers = [Worker(a, PREFILL, client_factory(a)) for a in prefill_addresses]
        self.workers += [Worker(a, DECODE, client_factory(a)) for a in decode_addresses]

    def of_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role]

    def healthy(self, role: str) -> list[Worker]:
        return [w for w in self.of_role(role) if w.healthy]

    def pick(self, role: str) -> Worker | None:
        """The least-loaded healthy worker of `role`, counted as sent one more request."""
        candidates = self.healthy(role)
        if not candidates:
            return None
        worker = min(candidates, key=Worker.score)
        worker.sent_since_report += 1
        return worker

    def mark_failed(self, worker: Worker, reason: str) -> None:
        if worker.healthy:
            log.warning("%s worker %s is unhealthy: %s", worker.role, worker.address, reason)
        worker.healthy = False
        worker.last_error = reason

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in self.workers))

    async def close(self) -> None:
        await asyncio.gather(*(w.client.close() for w in self.workers))

    async def _poll(self, worker: Worker) -> None:
        try:
            load = await worker.client.get_load(worker.role, self._poll_timeout_s)
        except WorkerRpcError as exc:
            self.mark_failed(worker, f"GetLoad: {exc.code.name}: {exc.details}")
            return
        if not worker.healthy:
            log.info("%s worker %s is healthy", worker.role, worker.address)
        worker.load = load
        worker.sent_since_report = 0
        worker.healthy = load.serving
        worker.last_error = None if load.serving else "draining"
