"""Client channels: one place for credentials, message limits and reconnect behaviour."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc

# Reconnect to a restarted peer within a second; gRPC's default backoff grows towards 120 s,
# so a peer that was down for a while would stay unreachable long after it is back.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """Credentials for calling a TLS peer whose certificate `ca` signed (None: plaintext); with
    `cert` and `key` this side presents a client certificate too (mTLS)."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both its certificate and its key")
    if ca is None:
        if cert is not None:
            raise ValueError("a client certificate (mTLS) needs the peers' CA too")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def open_channel(
    address: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    max_receive_bytes: int | None = None,
    max_send_bytes: int | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An asyncio channel that reconnects quickly (TLS when `credentials` is given;
    `interceptors`: e.g. `rpc.auth.cluster_token_interceptors`)."""
    options: list[tuple[str, int]] = []
    if max_receive_bytes is not None:
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    if max_send_bytes is not None:
        options.append(("grpc.max_send_message_length", max_send_bytes))
    options += RECONNECT_OPTIONS
    if credentials is not None:
        return grpc.aio.secure_channel(
            address, credentials, options, interceptors=list(interceptors) or None
        )
    return grpc.aio.insecure_channel(address, options, interceptors=list(interceptors) or None)
