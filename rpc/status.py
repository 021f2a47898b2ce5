"""The one error -> status table: each `ErrorKind` as a gRPC code and as an HTTP status."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from contract.errors import ErrorKind, kind_of


@dataclass(frozen=True, slots=True)
class Status:
    grpc: grpc.StatusCode
    http: int


STATUS: dict[ErrorKind, Status] = {
    ErrorKind.INVALID: Status(grpc.StatusCode.INVALID_ARGUMENT, 400),
    ErrorKind.UNAUTHORIZED: Status(grpc.StatusCode.UNAUTHENTICATED, 401),
    ErrorKind.NOT_FOUND: Status(grpc.StatusCode.NOT_FOUND, 404),
    ErrorKind.TOO_LARGE: Status(grpc.StatusCode.INVALID_ARGUMENT, 413),
    ErrorKind.OVERLOADED: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    ErrorKind.UNAVAILABLE: Status(grpc.StatusCode.UNAVAILABLE, 503),
    ErrorKind.DEADLINE: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ErrorKind.PRECONDITION: Status(grpc.StatusCode.FAILED_PRECONDITION, 503),
    ErrorKind.DATA_LOSS: Status(grpc.StatusCode.DATA_LOSS, 500),
    ErrorKind.INTERNAL: Status(grpc.StatusCode.INTERNAL, 500),
}

# An HTTP status back to a kind (the first kind in ErrorKind's order: a client-facing one).
KIND_OF_HTTP: dict[int, ErrorKind] = {}
for _kind in ErrorKind:
    KIND_OF_HTTP.setdefault(STATUS[_kind].http, _kind)


def grpc_code(kind: ErrorKind) -> grpc.StatusCode:
    return STATUS[kind].grpc


def http_status(kind: ErrorKind) -> int:
    return STATUS[kind].http


def status_for(exc: BaseException) -> grpc.StatusCode:
    return STATUS[kind_of(exc)].grpc


# Messages quote what the caller sent (transfer ids, hashes). A long one would push the
# status past gRPC's 8 KiB metadata limit: the caller would get the stream reset with
# RESOURCE_EXHAUSTED instead of the status meant for it.
MAX_DETAILS_CHARS = 1024


def details_of(exc: BaseException) -> str:
    details = f"{type(exc).__name__}: {exc}"
    if len(details) > MAX_DETAILS_CHARS:
        details = details[: MAX_DETAILS_CHARS - 3] + "..."
    return details


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status that fits `exc` (raises, as context.abort does)."""
    await context.abort(status_for(exc), details_of(exc))
