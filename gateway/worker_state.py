"""What the gateway knows about one worker (its pool, router and metrics all read this)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.worker_client import LoadSnapshot, WorkerClient

PREFILL = "prefill"
DECODE = "decode"


@dataclass(slots=True, eq=False)
class Worker:
    address: str
    role: str  # PREFILL or DECODE
    client: WorkerClient
    healthy: bool = False
    load: LoadSnapshot | None = None
    sent_since_report: int = 0  # requests routed here since `load` was taken
    in_flight: int = 0  # this gateway's requests on the worker now
    pending_prefill_tokens: int = 0  # prompt tokens this gateway's open prefills here compute
    foreign_load: int = 0  # requests on it at the last report that this gateway did not send
    last_error: str | None = None

    def score(self) -> tuple[int, float, str]:
        """Lower is better: queue depth (reported + sent since), then KV usage."""
        depth = self.load.queue_depth if self.load else 0
        usage = self.load.kv_cache_usage if self.load else 0.0
        return (depth + self.sent_since_report, usage, self.address)
