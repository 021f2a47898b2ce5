"""The registry of transports, and the order `auto` tries them in."""

from __future__ import annotations

from kvtransfer.transport import Transport
from kvtransfer.transport_grpc import GrpcTransport
from kvtransfer.transport_shm import ShmTransport

TRANSPORTS: dict[str, type[Transport]] = {t.name: t for t in (GrpcTransport, ShmTransport)}
# auto: the first usable one, falling back along the list when a read's bytes cannot be trusted.
AUTO_ORDER = ("shm", "grpc")
TRANSPORT_CHOICES = ("auto", *TRANSPORTS)
