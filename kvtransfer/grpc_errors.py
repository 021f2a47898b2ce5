"""Exceptions -> gRPC status codes, for the servicers in kvtransfer and the workers."""

from __future__ import annotations

import grpc

from kvtransfer.chunking import ChecksumError, TransferError
from kvtransfer.layout import IncompatibleLayoutError
from kvtransfer.lease import LeaseError

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (IncompatibleLayoutError, grpc.StatusCode.FAILED_PRECONDITION),
    (LeaseError, grpc.StatusCode.FAILED_PRECONDITION),  # unknown/expired lease, stale epoch
    (ChecksumError, grpc.StatusCode.DATA_LOSS),
    (TransferError, grpc.StatusCode.INTERNAL),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # includes KVAddressError
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


# Messages quote what the caller sent (transfer ids, hashes). A long one would push the
# status past gRPC's 8 KiB metadata limit: the caller would get the stream reset with
# RESOURCE_EXHAUSTED instead of the status meant for it.
MAX_DETAILS_CHARS = 1024


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status that fits `exc` (raises, as context.abort does)."""
    details = f"{type(exc).__name__}: {exc}"
    if len(details) > MAX_DETAILS_CHARS:
        details = details[: MAX_DETAILS_CHARS - 3] + "..."
    await context.abort(status_for(exc), details)
