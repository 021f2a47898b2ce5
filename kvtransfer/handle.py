"""The KV handle: what a prefill worker gives back and a decode worker pulls from.

A prefill worker that has the cluster secret signs each handle: an HMAC-SHA256, under a key
derived from the secret, over the transfer id, the KV endpoint, the epoch, the block ids and an
expiry (plus engine id, host id and layout hash). A decode worker with the secret checks the
signature (in constant time) and the expiry before it opens any connection, so it dials only
endpoints a trusted prefill worker vouched for.
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass, replace

from contract.errors import ErrorKind

HANDLE_KEY_PURPOSE = "kv-handle"  # ClusterSecret.derive(HANDLE_KEY_PURPOSE): the signing key
CLOCK_SKEW_MS = 5_000  # tolerated between the two workers' clocks when checking the expiry


@dataclass(frozen=True, slots=True)
class KVHandle:
    engine_id: str
    epoch: int
    kv_endpoint: str  # host:port of the prefill worker's KVTransferService
    transfer_id: str
    block_ids: tuple[int, ...]
    num_tokens: int  # prompt tokens whose KV the blocks hold
    first_token: int
    first_logprob: float | None
    first_top_logprobs: dict[int, float] | None  # set when logprobs were asked for
    lease_ms: int
    compat_hash: str
    host_id: str
    expires_at_ms: int = 0  # Unix time (ms) after which the signature is void
    signature: bytes = b""  # HMAC-SHA256 (see module doc); empty: unsigned

    def __post_init__(self) -> None:
        if not self.transfer_id:
            raise ValueError("KV handle: transfer_id is empty")
        if not self.kv_endpoint:
            raise ValueError("KV handle: kv_endpoint is empty")
        if not self.block_ids:
            raise ValueError("KV handle: no block ids")
        if self.num_tokens < 1:
            raise ValueError("KV handle: num_tokens must be >= 1")


class HandleSignatureError(Exception):
    """The handle is unsigned, forged, altered or past its expiry: prefill again."""

    kind = ErrorKind.PRECONDITION


def _signed_bytes(handle: KVHandle) -> bytes:
    fields = [
        handle.transfer_id,
        handle.kv_endpoint,
        handle.epoch,
        list(handle.block_ids),
        handle.expires_at_ms,
        handle.engine_id,
        handle.host_id,
        handle.compat_hash,
    ]
    return json.dumps(fields, separators=(",", ":")).encode()


def sign_handle(handle: KVHandle, key: bytes, valid_ms: int) -> KVHandle:
    """The handle with an expiry `valid_ms` from now and its signature."""
    signed = replace(handle, expires_at_ms=int(time.time() * 1000) + valid_ms, signature=b"")
    digest = hmac.new(key, _signed_bytes(signed), "sha256").digest()
    return replace(signed, signature=digest)


def verify_handle(handle: KVHandle, key: bytes, now_ms: int | None = None) -> None:
    """Raises HandleSignatureError unless `key` signed exactly this handle and it is unexpired."""
    expected = hmac.new(key, _signed_bytes(handle), "sha256").digest()
    if not hmac.compare_digest(expected, handle.signature):
        raise HandleSignatureError(
            f"KV handle for transfer {handle.transfer_id[:64]!r} is not signed by a trusted "
            "prefill worker"
        )
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if now_ms > handle.expires_at_ms + CLOCK_SKEW_MS:
        raise HandleSignatureError(
            f"KV handle for transfer {handle.transfer_id[:64]!r} expired "
            f"{now_ms - handle.expires_at_ms} ms ago"
        )
