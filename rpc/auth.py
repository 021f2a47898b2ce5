"""Bearer tokens in call metadata: the header a client sends and the server-side check."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
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
