"""KV handle signatures: a handle verifies only under the key that signed it, unaltered and
unexpired; the cluster secret's derived keys differ by purpose."""

from __future__ import annotations

import dataclasses
import time

import pytest

from kvtransfer.handle import (
    CLOCK_SKEW_MS,
    HANDLE_KEY_PURPOSE,
    HandleSignatureError,
    KVHandle,
    sign_handle,
    verify_handle,
)
from kvtransfer.wire import handle_from_pb, handle_to_pb
from rpc.auth import ClusterSecret

SECRET = ClusterSecret("correct horse battery staple")
KEY = SECRET.derive(HANDLE_KEY_PURPOSE)


def handle(**kw) -> KVHandle:
    fields = dict(engine_id="prefill-0", epoch=7, kv_endpoint="127.0.0.1:50061",
                  transfer_id="t-1", block_ids=(3, 4, 5), num_tokens=40, first_token=9,
                  first_logprob=None, first_top_logprobs=None, lease_ms=30_000,
                  compat_hash="abc", host_id="host-a")  # fmt: skip
    fields.update(kw)
    return KVHandle(**fields)


def test_a_signed_handle_verifies_and_survives_the_wire() -> None:
    signed = sign_handle(handle(), KEY, valid_ms=30_000)
    assert len(signed.signature) == 32 and signed.expires_at_ms > time.time() * 1000
    verify_handle(signed, KEY)
    verify_handle(handle_from_pb(handle_to_pb(signed)), KEY)


@pytest.mark.parametrize(
    "change",
    [
        {"kv_endpoint": "10.0.0.9:22"},
        {"kv_endpoint": "unix:/tmp/x"},
        {"transfer_id": "t-2"},
        {"epoch": 8},
        {"block_ids": (3, 4, 6)},
        {"expires_at_ms": 2**62},
        {"host_id": "host-b"},
        {"signature": b""},
    ],
)
def test_any_altered_field_voids_the_signature(change) -> None:
    signed = sign_handle(handle(), KEY, valid_ms=30_000)
    with pytest.raises(HandleSignatureError, match="not signed by a trusted prefill worker"):
        verify_handle(dataclasses.replace(signed, **change), KEY)


def test_unsigned_foreign_key_and_expired_handles_are_refused() -> None:
    with pytest.raises(HandleSignatureError):
        verify_handle(handle(), KEY)
    other = ClusterSecret("another cluster's secret").derive(HANDLE_KEY_PURPOSE)
    with pytest.raises(HandleSignatureError):
        verify_handle(sign_handle(handle(), other, valid_ms=30_000), KEY)
    old = sign_handle(handle(), KEY, valid_ms=0)
    verify_handle(old, KEY, now_ms=old.expires_at_ms + CLOCK_SKEW_MS)  # within the skew
    with pytest.raises(HandleSignatureError, match="expired"):
        verify_handle(old, KEY, now_ms=old.expires_at_ms + CLOCK_SKEW_MS + 1)


def test_the_rpc_token_is_not_the_signing_key_and_secrets_are_not_printed() -> None:
    assert SECRET.token != KEY.hex() and len(SECRET.token) == 64
    assert "horse" not in repr(SECRET)
    with pytest.raises(ValueError, match="at least 16"):
        ClusterSecret("short")
