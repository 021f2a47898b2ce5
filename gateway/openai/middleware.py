"""ASGI guards in front of the routes: the API key on /v1/*, the request body size, and the
number and size of request headers."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import ErrorKind, GatewayError
from gateway.openai.errors import error_body, error_response


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every /v1/* path, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = _header(scope, b"authorization")
            if not hmac.compare_digest(given, self._expected):
                error = GatewayError(ErrorKind.UNAUTHORIZED, "invalid or missing API key")
                response = error_response(error)
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI turns any other exception met while it reads the body
    into a 400 "error parsing the body", but lets an HTTPException through to the handlers."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is over {max_bytes} bytes")


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length").decode("latin-1")
        if declared.isdigit() and int(declared) > self._max:
            await self._reject(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self._max:
                raise _BodyTooLarge(self._max)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = GatewayError(ErrorKind.TOO_LARGE, f"the request body is over {self._max} bytes")
        response: JSONResponse = error_response(error)
        await response(scope, receive, send)


class HeaderLimitMiddleware:
    """431 for more than `max_count` headers or `max_bytes` of them in all. The HTTP parser
    (h11) bounds only a head that arrives in pieces; one sent in a single write of any size
    reaches the app parsed."""

    def __init__(self, app: ASGIApp, max_count: int, max_bytes: int) -> None:
        self.app = app
        self._max_count = max_count
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            size = sum(len(name) + len(value) + 4 for name, value in headers)  # "k: v\r\n"
            if len(headers) > self._max_count or size > self._max_bytes:
                message = (
                    f"too many request headers ({len(headers)} headers, {size} bytes; "
                    f"at most {self._max_count} and {self._max_bytes} bytes)"
                )
                body = error_body(GatewayError(ErrorKind.TOO_LARGE, message))
                body["error"]["code"] = 431
                await JSONResponse(body, status_code=431)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _header(scope: dict[str, Any], name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return b""
