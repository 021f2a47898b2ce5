"""Worker configuration: one dataclass per role, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.limits import MAX_LOGPROBS
from kvtransfer.transports import TRANSPORT_CHOICES
from rpc.auth import ClusterSecret

ROLES = ("prefill", "decode", "both")


def _check_max_logprobs(value: int) -> None:
    if not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(
            f"max_logprobs must be in [0, {MAX_LOGPROBS}] (the engine's limit), got {value}"
        )


@dataclass(frozen=True, slots=True)
class PrefillWorkerConfig:
    lease_ms: int = 30_000  # default lease on a prompt's blocks (a Prefill may ask for less/more)
    max_lease_ms: int = 300_000
    enable_shm: bool = True  # offer the shared-memory transport to same-host decode workers
    transfer_delay_ms: int = 0  # debug: sleep before each transfer chunk (tests of expiry/cancel)
    fill_freed_kv: bool = False  # debug: overwrite a lease's blocks with a sentinel when freed
    advertise_address: str | None = None  # host:port put in KV handles; None: the bound address
    engine_id: str | None = None
    drain_timeout_s: float = 30.0
    cluster_secret: ClusterSecret | None = None  # signs KV handles (None: unsigned)
    max_logprobs: int = MAX_LOGPROBS  # requests asking for more logprobs: INVALID_ARGUMENT

    def __post_init__(self) -> None:
        _check_max_logprobs(self.max_logprobs)
        if not 1 <= self.lease_ms <= self.max_lease_ms:
            raise ValueError(
                f"need 1 <= lease_ms ({self.lease_ms}) <= max_lease_ms ({self.max_lease_ms})"
            )
        if self.transfer_delay_ms < 0:
            raise ValueError(f"transfer_delay_ms must be >= 0, got {self.transfer_delay_ms}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


@dataclass(frozen=True, slots=True)
class DecodeWorkerConfig:
    kv_transport: str = "auto"  # auto: shared memory with a same-host prefill worker, else gRPC
    peer_tls_ca: Path | None = None  # trust roots for TLS prefill workers (None: plaintext)
    peer_tls_cert: Path | None = None  # client certificate for mTLS prefill workers
    peer_tls_key: Path | None = None
    # Sent to prefill workers and checks KV handles' signatures (None: unsigned handles accepted)
    cluster_secret: ClusterSecret | None = None
    max_chunk_bytes: int = 0  # 0: the server's default (1 MiB)
    engine_id: str | None = None
    drain_timeout_s: float = 30.0
    max_logprobs: int = MAX_LOGPROBS  # requests asking for more logprobs: INVALID_ARGUMENT
    step_delay_ms: int = 0  # debug: sleep after every engine step (tests that kill mid-decode)

    def __post_init__(self) -> None:
        _check_max_logprobs(self.max_logprobs)
        if self.step_delay_ms < 0:
            raise ValueError(f"step_delay_ms must be >= 0, got {self.step_delay_ms}")
        if self.kv_transport not in TRANSPORT_CHOICES:
            raise ValueError(
                f"kv_transport must be one of {TRANSPORT_CHOICES}, got {self.kv_transport!r}"
            )
        if self.max_chunk_bytes < 0:
            raise ValueError(f"max_chunk_bytes must be >= 0, got {self.max_chunk_bytes}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")


@dataclass(frozen=True, slots=True)
class BothWorkerConfig:
    """One engine in both roles (vLLM's `kv_both`): it prefills for other decode workers, decodes
    what other prefill workers computed, and runs both halves of a request itself, copying its own
    handles in-process instead of pulling them."""

    prefill: PrefillWorkerConfig = PrefillWorkerConfig()
    decode: DecodeWorkerConfig = DecodeWorkerConfig()
    engine_id: str | None = None
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
