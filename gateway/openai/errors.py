"""OpenAI's error body and the HTTP status of every error kind (never FastAPI's 422)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import ErrorKind, GatewayError
from rpc.status import KIND_OF_HTTP, http_status


def error_body(exc: GatewayError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.kind.value,
            "param": exc.param,
            "code": http_status(exc.kind),
        }
    }


def error_response(exc: GatewayError, retry_after_s: int = 1) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if exc.kind is ErrorKind.OVERLOADED else None
    return JSONResponse(error_body(exc), status_code=http_status(exc.kind), headers=headers)


def validation_error(exc: RequestValidationError) -> GatewayError:
    """FastAPI's validation error as one readable 400: the first problem and where it is."""
    errors = exc.errors()
    if not errors:
        return GatewayError(ErrorKind.INVALID, "invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return GatewayError(ErrorKind.INVALID, "the request body is not valid JSON")
    where = f" ({param})" if param else ""
    return GatewayError(ErrorKind.INVALID, f"{first.get('msg', 'invalid value')}{where}", param)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return error_response(exc, retry_after_s)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = KIND_OF_HTTP.get(exc.status_code, ErrorKind.INVALID)
        body = error_body(GatewayError(kind, str(exc.detail)))
        body["error"]["code"] = exc.status_code
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
