"""Decode worker configuration: one dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvtransfer.client import TRANSPORTS


@dataclass(frozen=True, slots=True)
class DecodeWorkerConfig:
    kv_transport: str = "auto"  # auto: shared memory with a same-host prefill worker, else gRPC
    peer_tls_ca: Path | None = None  # trust roots for TLS prefill workers (None: plaintext)
    max_chunk_bytes: int = 0  # 0: the server's default (1 MiB)
    engine_id: str | None = None
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {TRANSPORTS}, got {self.kv_transport!r}")
        if self.max_chunk_bytes < 0:
            raise ValueError(f"max_chunk_bytes must be >= 0, got {self.max_chunk_bytes}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
