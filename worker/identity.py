"""Who a worker is: a name, an epoch that changes on every start (handles and load reports from
an earlier instance are void), and the host it runs on (same host: shared-memory transfers)."""

from __future__ import annotations

import time
import uuid

from kvtransfer.exporter import WorkerIdentity
from kvtransfer.shm import host_id


def new_identity(role: str, engine_id: str | None = None) -> WorkerIdentity:
    return WorkerIdentity(
        engine_id=engine_id or f"{role}-{uuid.uuid4().hex[:8]}",
        epoch=time.time_ns(),
        host_id=host_id(),
    )
