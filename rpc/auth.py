"""Credentials in call metadata: the API key of the front door (bearer token) and the cluster
credential every worker RPC needs."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying `token` as `authorization: Bearer <token>` (None: no metadata)."""
    return (("authorization", f"Bearer {token}"),) if token else None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call to `services` needs `authorization: Bearer <token>` metadata, compared in
    constant time; other services (health, reflection) stay open."""

    def __init__(self, token: str, services: Iterable[str], message: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefixes = tuple(f"/{name}/" for name in services)
        self._message = message

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return handler
        return _refusing(handler, self._message)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# --------------------------------------------------------------------------- cluster credential
#
# Workers trust only callers that hold the cluster secret: every call to a worker service carries
# a token derived from it in CLUSTER_TOKEN_KEY metadata. Prefill workers sign KV handles with a
# second key derived from the same secret (kvtransfer/handle.py), so a token seen on the wire
# does not let anyone forge a handle.

CLUSTER_SECRET_ENV = "PDSERVE_CLUSTER_SECRET"
CLUSTER_TOKEN_KEY = "x-pdserve-cluster-token"
MIN_SECRET_CHARS = 16


class ClusterSecret:
    """The shared secret of one cluster and the keys derived from it (never printed)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        secret = secret.strip()
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the cluster secret must have at least {MIN_SECRET_CHARS} characters")
        self._secret = secret.encode()

    def derive(self, purpose: str) -> bytes:
        return hmac.new(self._secret, f"pdserve/{purpose}/v1".encode(), "sha256").digest()

    @property
    def token(self) -> str:
        """What a caller sends in CLUSTER_TOKEN_KEY metadata."""
        return self.derive("rpc-token").hex()

    def __repr__(self) -> str:
        return "ClusterSecret(<hidden>)"


def load_cluster_secret(path: Path | None, environ: Mapping[str, str]) -> ClusterSecret | None:
    """The secret from the file `path` (--cluster-secret-file), else from CLUSTER_SECRET_ENV."""
    if path is not None:
        return ClusterSecret(Path(path).read_text())
    value = environ.get(CLUSTER_SECRET_ENV)
    return ClusterSecret(value) if value else None


def require_cluster_secret(path: Path | None, environ: Mapping[str, str]) -> ClusterSecret:
    secret = load_cluster_secret(path, environ)
    if secret is None:
        raise ValueError(
            f"no cluster secret: set {CLUSTER_SECRET_ENV} or pass --cluster-secret-file "
            "(the same on the gateway and every worker; `pdserve serve` makes one per run)"
        )
    return secret


def add_cluster_secret_arg(group) -> None:
    group.add_argument(
        "--cluster-secret-file",
        type=Path,
        default=None,
        help=f"file holding the cluster secret shared by gateway and workers "
        f"(default: ${CLUSTER_SECRET_ENV})",
    )


OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call except health and reflection needs the cluster token, compared in constant
    time; others get UNAUTHENTICATED before any handler runs."""

    def __init__(self, secret: ClusterSecret) -> None:
        self._expected = secret.token.encode()
        self._open = tuple(f"/{name}/" for name in OPEN_SERVICES)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open):
            return handler
        given = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == CLUSTER_TOKEN_KEY:
                given = value.encode() if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(given, self._expected):
            return handler
        return _refusing(handler, "missing or wrong cluster credential")


def _with_metadata(
    details: grpc.aio.ClientCallDetails, metadata: tuple[tuple[str, str], ...]
) -> grpc.aio.ClientCallDetails:
    return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *metadata))


# Two classes, not one with both methods: a grpc.aio channel files each interceptor under the
# first call kind it implements only.
class _UnaryUnaryMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self._metadata), request)


class _UnaryStreamMetadata(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self._metadata), request)


def cluster_token_metadata(secret: ClusterSecret | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the cluster token (empty without a secret)."""
    return ((CLUSTER_TOKEN_KEY, secret.token),) if secret is not None else ()


def cluster_token_interceptors(secret: ClusterSecret | None) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send the cluster token on every call (none without a secret).
    Worker services have unary and server-streaming methods only."""
    if secret is None:
        return []
    metadata = ((CLUSTER_TOKEN_KEY, secret.token),)
    return [_UnaryUnaryMetadata(metadata), _UnaryStreamMetadata(metadata)]
