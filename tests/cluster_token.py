"""Channels to workers started from the CLI: they need the cluster credential, which the tests
pass to every child through PDSERVE_CLUSTER_SECRET (tests/conftest.py)."""

from __future__ import annotations

import collections
import os

import grpc

from rpc.auth import CLUSTER_SECRET_ENV, CLUSTER_TOKEN_KEY, ClusterSecret


def token_metadata(secret: str | None = None) -> tuple[tuple[str, str], ...]:
    secret = secret or os.environ[CLUSTER_SECRET_ENV]
    return ((CLUSTER_TOKEN_KEY, ClusterSecret(secret).token),)


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _Token(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, secret: str | None) -> None:
        self._metadata = token_metadata(secret)

    def _details(self, d):
        metadata = (*(d.metadata or ()), *self._metadata)
        return _Details(d.method, d.timeout, metadata, d.credentials,
                        getattr(d, "wait_for_ready", None), getattr(d, "compression", None))  # fmt: skip

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def worker_channel(address: str, secret: str | None = None) -> grpc.Channel:
    """A plaintext channel whose calls carry the cluster token (of `secret`, default the
    tests' PDSERVE_CLUSTER_SECRET)."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _Token(secret))
