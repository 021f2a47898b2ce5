"""Errors the gateway reports to its clients, one kind per HTTP status / gRPC code."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What went wrong, independent of the transport (HTTP status, gRPC code)."""

    INVALID = "invalid_request_error"  # 400 / INVALID_ARGUMENT
    UNAUTHORIZED = "authentication_error"  # 401 / UNAUTHENTICATED
    NOT_FOUND = "not_found_error"  # 404 / NOT_FOUND
    TOO_LARGE = "request_too_large"  # 413 / INVALID_ARGUMENT
    OVERLOADED = "rate_limit_error"  # 429 / RESOURCE_EXHAUSTED
    UNAVAILABLE = "service_unavailable"  # 503 / UNAVAILABLE
    DEADLINE = "timeout_error"  # 504 / DEADLINE_EXCEEDED
    INTERNAL = "internal_error"  # 500 / INTERNAL


class GatewayError(Exception):
    """A request failed; `message` is safe to show to the client."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"GatewayError({self.kind.name}, {self.message!r}, param={self.param!r})"


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(ErrorKind.INVALID, message, param)
