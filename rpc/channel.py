"""Client channels: one place for credentials, message limits and reconnect behaviour."""

from __future__ import annotations

from pathlib import Path

import grpc

# Reconnect to a restarted peer within a second; gRPC's default backoff grows towards 120 s,
# so a peer that was down for a while would stay unreachable long after it is back.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def channel_credentials(ca: Path | None) -> grpc.ChannelCredentials | None:
    """Credentials for calling a TLS peer whose certificate `ca` signed (None: plaintext)."""
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()) if ca else None


def open_channel(
    address: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    max_receive_bytes: int | None = None,
    max_send_bytes: int | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel that reconnects quickly (TLS when `credentials` is given)."""
    options: list[tuple[str, int]] = []
    if max_receive_bytes is not None:
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    if max_send_bytes is not None:
        options.append(("grpc.max_send_message_length", max_send_bytes))
    options += RECONNECT_OPTIONS
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options)
    return grpc.aio.insecure_channel(address, options)
