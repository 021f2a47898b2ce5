"""The decode side of a transfer: pulls pages from a prefill worker's KVTransferService.

Control always goes over gRPC; bytes go through a `Transport` (transport.py): the same gRPC
channel (bounded, checksummed chunks) or, when both workers share a host, a shared-memory segment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kvtransfer import wire
from kvtransfer.chunking import ChecksumError, TransferError
from kvtransfer.exporter import ReadRequest
from kvtransfer.layout import check_compatible
from kvtransfer.pages import PagedKV
from kvtransfer.transport import PeerInfo, Transport, TransportOptions
from kvtransfer.transports import AUTO_ORDER, TRANSPORT_CHOICES, TRANSPORTS
from protos.pdserve.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc
from rpc.channel import open_channel

log = logging.getLogger(__name__)

_MAX_MESSAGE = 8 << 20  # chunks are <= 1 MiB; leave room for the envelope

__all__ = ["KVTransferClient", "PeerInfo", "PullResult", "TRANSPORT_CHOICES"]


@dataclass(frozen=True, slots=True)
class PullResult:
    transport: str  # the name of the transport that moved the bytes ("grpc", "shm")
    num_bytes: int
    seconds: float


class KVTransferClient:
    """Talks to one prefill worker. Safe to share between the requests of one event loop."""

    def __init__(
        self,
        endpoint: str,
        local: PagedKV,
        *,
        local_host_id: str,
        transport: str = "auto",
        credentials: grpc.ChannelCredentials | None = None,
        max_chunk_bytes: int = 0,
        streams: int = 2,
        shm_pieces: int = 1,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        if transport not in TRANSPORT_CHOICES:
            raise ValueError(f"transport must be one of {TRANSPORT_CHOICES}, got {transport!r}")
        options = TransportOptions(streams=streams, shm_pieces=shm_pieces)
        self._channel = open_channel(
            endpoint,
            credentials=credentials,
            max_receive_bytes=_MAX_MESSAGE,
            interceptors=interceptors,
        )
        self._stub = kvtransfer_pb2_grpc.KVTransferServiceStub(self._channel)
        self._transports: dict[str, Transport] = {
            name: cls(self._channel, local, options) for name, cls in TRANSPORTS.items()
        }
        self.endpoint = endpoint
        self._local = local
        self._local_host_id = local_host_id
        self._transport = transport
        self._max_chunk_bytes = max_chunk_bytes
        self._peer: PeerInfo | None = None
        # Transports that failed a read the next one then completed (a same-host segment that
        # could not be attached): `auto` skips them from then on.
        self._broken: set[str] = set()

    async def handshake(self, *, refresh: bool = False, timeout: float | None = 10.0) -> PeerInfo:
        """Compare layouts (IncompatibleLayoutError on mismatch); cached until `refresh`."""
        if self._peer is not None and not refresh:
            return self._peer
        layout = self._local.layout
        reply = await self._stub.Handshake(
            kvtransfer_pb2.HandshakeRequest(
                layout=wire.layout_to_pb(layout), compat_hash=layout.compat_hash()
            ),
            timeout=timeout,
        )
        remote = wire.layout_from_pb(reply.layout)
        check_compatible(layout, remote, reply.compat_hash)
        self._peer = PeerInfo(
            reply.engine_id,
            reply.epoch,
            remote,
            reply.compat_hash,
            reply.host_id,
            reply.shm_available,
        )
        log.info(
            "kv handshake endpoint=%s engine_id=%s epoch=%d transport=%s",
            self.endpoint,
            reply.engine_id,
            reply.epoch,
            self._candidates(self._peer)[0].name,
        )
        return self._peer

    async def pull(
        self,
        transfer_id: str,
        epoch: int,
        src_block_ids: list[int],
        dst_block_ids: list[int],
        *,
        timeout: float | None = None,
    ) -> PullResult:
        """Copy the peer's pages of `src_block_ids` (all layers) into our `dst_block_ids`."""
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError("source and destination block lists differ in length")
        peer = await self.handshake()
        if peer.epoch != epoch:
            peer = await self.handshake(refresh=True)
        request = ReadRequest(
            transfer_id,
            tuple(src_block_ids),
            (),
            epoch,
            peer.compat_hash,
            self._max_chunk_bytes,
            packed=True,
        )
        start = time.perf_counter()
        candidates = self._candidates(peer)
        suspect: str | None = None
        for i, transport in enumerate(candidates):
            try:
                num_bytes = await transport.read(request, dst_block_ids, timeout)
            except TransferError as exc:
                if i + 1 == len(candidates):
                    raise
                fallback = candidates[i + 1].name
                if isinstance(exc, ChecksumError):  # bytes changed under us: this transfer only
                    log.warning("kv %s transfer failed (%s), pulling over %s instead",
                                transport.name, exc, fallback)  # fmt: skip
                else:
                    log.warning("kv %s unusable (%s), falling back to %s",
                                transport.name, exc, fallback)  # fmt: skip
                    suspect = transport.name
                continue
            # Blame a transport only once the same transfer was readable another way: a segment
            # also vanishes when its lease ends (expired or released), and then every read fails.
            if suspect is not None:
                self._broken.add(suspect)
            return PullResult(transport.name, num_bytes, time.perf_counter() - start)
        raise AssertionError("unreachable: the last candidate raises")

    async def extend(self, transfer_id: str, lease_ms: int) -> int:
        reply = await self._stub.ExtendLease(
            kvtransfer_pb2.ExtendLeaseRequest(transfer_id=transfer_id, lease_ms=lease_ms),
            timeout=10,
        )
        return reply.lease_ms

    async def release(self, transfer_id: str, *, timeout: float | None = 10.0) -> bool:
        reply = await self._stub.Release(
            kvtransfer_pb2.KVReleaseRequest(transfer_id=transfer_id), timeout=timeout
        )
        return reply.released

    async def close(self) -> None:
        await self._channel.close()
        for transport in self._transports.values():
            transport.close()

    def _candidates(self, peer: PeerInfo) -> list[Transport]:
        """The transports to try, in order: the configured one, or for `auto` every usable one
        that has not failed before (gRPC always is)."""
        if self._transport != "auto":
            return [self._transports[self._transport]]
        return [
            self._transports[name]
            for name in AUTO_ORDER
            if name not in self._broken and self._transports[name].usable(peer, self._local_host_id)
        ]
