"""What went wrong, independent of the transport: every error a client or a peer can see is one
`ErrorKind`. `rpc/status.py` maps each kind to its gRPC code and HTTP status (the one table).

An exception says its kind with a class attribute `kind` (or, like `GatewayError`, an instance
attribute); any other ValueError is INVALID and anything else INTERNAL."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    # The values are OpenAI's error `type` strings where a client can see the kind.
    INVALID = "invalid_request_error"  # bad input: the same request fails again
    UNAUTHORIZED = "authentication_error"
    NOT_FOUND = "not_found_error"
    TOO_LARGE = "request_too_large"
    OVERLOADED = "rate_limit_error"  # no room now: retry later (or elsewhere)
    UNAVAILABLE = "service_unavailable"  # this service cannot serve (down, draining, stopped)
    DEADLINE = "timeout_error"
    INTERNAL = "internal_error"
    # Between services only (the gateway turns them into one of the above for its clients):
    PRECONDITION = "failed_precondition"  # the caller's state is stale (lease, epoch, layout)
    DATA_LOSS = "data_loss"  # bytes arrived corrupted


def kind_of(exc: BaseException) -> ErrorKind:
    kind = getattr(exc, "kind", None)
    if isinstance(kind, ErrorKind):
        return kind
    if isinstance(exc, ValueError):
        return ErrorKind.INVALID
    return ErrorKind.INTERNAL
