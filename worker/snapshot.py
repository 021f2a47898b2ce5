"""A worker's state as load reports and debug endpoints see it (either role)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.engine import EngineStats


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    stats: EngineStats
    num_active: int  # prefills running (prefill) or streams open (decode)
    num_held: int  # blocks' owners outside the batch: open leases (prefill), imports (decode)
    held_transfer_ids: tuple[str, ...] = ()  # prefill: the open leases
    num_shm_segments: int = 0  # prefill: shared-memory segments tied to leases
    kv_transfer_bytes_total: int = 0  # decode: KV bytes pulled so far
    kv_transfer_seconds_total: float = 0.0
    block_size: int = 0  # tokens per KV block
