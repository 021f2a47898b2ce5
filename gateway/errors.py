"""Errors the gateway reports to its clients. Their kinds (`contract.errors.ErrorKind`) map to
HTTP statuses and gRPC codes in one table, `rpc/status.py`."""

from __future__ import annotations

from contract.errors import ErrorKind

__all__ = ["ErrorKind", "GatewayError", "invalid"]


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
