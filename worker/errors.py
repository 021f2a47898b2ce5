"""Errors of the worker itself (the engine's and the transfer service's have their own)."""

from __future__ import annotations

from contract.errors import ErrorKind


class WorkerDrainingError(RuntimeError):
    """The worker is shutting down and takes no new requests."""

    kind = ErrorKind.UNAVAILABLE
