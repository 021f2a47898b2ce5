"""The KVTransferService over real gRPC (in-process, 127.0.0.1) against bare KV tensors."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
import torch

from kvtransfer.client import KVTransferClient
from kvtransfer.exporter import KVExporter, WorkerIdentity
from kvtransfer.layout import IncompatibleLayoutError, KVLayout
from kvtransfer.lease import LeaseConfig, LeaseTable
from kvtransfer.pages import PagedKV
from kvtransfer.service import KVTransferServicer, add_to_server
from kvtransfer.shm import ShmExporter, host_id

LAYOUT = KVLayout(
    model_fingerprint="fp",
    dtype="float32",
    num_layers=2,
    num_kv_heads=2,
    head_dim=64,
    block_size=16,
    num_blocks=64,
)  # page = 8 KiB


def pool(layout: KVLayout, fill: float | None = None) -> torch.Tensor:
    shape = (
        layout.num_layers,
        2,
        layout.num_blocks,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
    )
    if fill is not None:
        return torch.full(shape, fill, dtype=getattr(torch, layout.dtype))
    return torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(
        getattr(torch, layout.dtype)
    )


class Peer:
    """A prefill-side KV service on a free port, with a lease table over a random pool."""

    def __init__(self, delay_s: float = 0.0, lease_ms: int = 5000, shm: bool = True) -> None:
        self.freed: list[str] = []
        self.pool = pool(LAYOUT)
        self.leases = LeaseTable(
            self._on_free, LeaseConfig(default_ms=lease_ms, reap_interval_s=0.01)
        )
        self.identity = WorkerIdentity("prefill-test", 42, host_id())
        self.shm = ShmExporter() if shm else None
        self.exporter = KVExporter(PagedKV(self.pool, LAYOUT), self.leases, self.identity, self.shm)
        self.servicer = KVTransferServicer(self.exporter, transfer_delay_s=delay_s)

    def _on_free(self, lease, reason):
        self.exporter.drop_attachments(lease)
        self.freed.append(lease.transfer_id)

    async def __aenter__(self):
        self.server = grpc.aio.server()
        add_to_server(self.server, self.servicer)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.leases.start_reaper()
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(0)
        self.leases.close()
        if self.shm is not None:
            self.shm.close()

    def client(self, local_pool, layout=LAYOUT, **kw) -> KVTransferClient:
        return KVTransferClient(
            f"127.0.0.1:{self.port}", PagedKV(local_pool, layout), local_host_id=host_id(), **kw
        )


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("transport", ["grpc", "shm", "auto"])
def test_pull_copies_exact_pages_and_release_frees(transport):
    async def main():
        async with Peer() as peer:
            peer.leases.grant("t1", [5, 9, 2])
            local = pool(LAYOUT, fill=0.0)
            client = peer.client(local, transport=transport, max_chunk_bytes=20_000)
            result = await client.pull("t1", 42, [5, 9, 2], [0, 1, 7])
            expected = "shm" if transport in ("shm", "auto") else "grpc"
            assert result.transport == expected
            assert result.num_bytes == 2 * 2 * 3 * LAYOUT.page_bytes
            for src, dst in [(5, 0), (9, 1), (2, 7)]:
                assert torch.equal(local[:, :, dst], peer.pool[:, :, src])
            assert not local[:, :, [3, 4, 5, 6]].any()
            assert await client.release("t1") is True
            assert peer.freed == ["t1"]
            assert peer.shm is None or len(peer.shm) == 0  # the segment went with the lease
            await client.close()

    run(main())


def test_handshake_refuses_an_incompatible_layout():
    async def main():
        async with Peer() as peer:
            other = dataclasses.replace(LAYOUT, dtype="bfloat16")
            client = peer.client(pool(other), layout=other)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.handshake()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "dtype" in info.value.details()
            await client.close()

    run(main())


def test_client_refuses_a_peer_with_another_model():
    async def main():
        async with Peer() as peer:
            client = peer.client(pool(LAYOUT))
            # Simulate a server lying about nothing but serving another model: compare locally.
            mine = dataclasses.replace(LAYOUT, model_fingerprint="other")
            client._local = PagedKV(pool(mine), mine)
            with pytest.raises((IncompatibleLayoutError, grpc.aio.AioRpcError)):
                await client.handshake()
            await client.close()

    run(main())


def test_read_after_expiry_fails_with_failed_precondition():
    async def main():
        async with Peer(lease_ms=50) as peer:
            peer.leases.grant("t1", [1, 2])
            await asyncio.sleep(0.15)
            assert peer.freed == ["t1"]
            client = peer.client(pool(LAYOUT, fill=0.0), transport="grpc")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.pull("t1", 42, [1, 2], [1, 2])
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "expired" in info.value.details()
            await client.close()

    run(main())


@pytest.mark.parametrize(
    "blocks,epoch,code",
    [
        ([1, 3], 42, grpc.StatusCode.INVALID_ARGUMENT),  # block 3 not held by the transfer
        ([1, 64], 42, grpc.StatusCode.INVALID_ARGUMENT),  # out of range
        ([1], 41, grpc.StatusCode.FAILED_PRECONDITION),  # handle from another instance
    ],
)
def test_bad_reads_are_refused(blocks, epoch, code):
    async def main():
        async with Peer() as peer:
            peer.leases.grant("t1", [1, 2])
            client = peer.client(pool(LAYOUT, fill=0.0), transport="grpc")
            await client.handshake()
            client._peer = dataclasses.replace(client._peer, epoch=epoch)  # skip the re-handshake
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.pull("t1", epoch, blocks, list(range(len(blocks))))
            assert info.value.code() == code
            await client.close()

    run(main())


def test_cancelled_pull_unpins_and_release_still_frees():
    async def main():
        async with Peer(delay_s=0.05) as peer:
            peer.leases.grant("t1", list(range(16)))
            client = peer.client(pool(LAYOUT, fill=0.0), transport="grpc", max_chunk_bytes=8192)
            task = asyncio.create_task(client.pull("t1", 42, list(range(16)), list(range(16))))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(50):  # the server notices the cancellation and unpins
                if peer.leases.get("t1").pins == 0:
                    break
                await asyncio.sleep(0.02)
            assert peer.leases.get("t1").pins == 0
            assert await client.release("t1") is True
            assert peer.freed == ["t1"]
            await client.close()

    run(main())


def test_lease_expiring_during_a_read_is_deferred_until_the_read_ends():
    async def main():
        async with Peer(delay_s=0.03, lease_ms=60) as peer:
            peer.leases.grant("t1", [1, 2, 3, 4])
            local = pool(LAYOUT, fill=0.0)
            client = peer.client(local, transport="grpc", max_chunk_bytes=8192)
            await client.pull("t1", 42, [1, 2, 3, 4], [1, 2, 3, 4])  # ~16 chunks x 30 ms
            assert torch.equal(local[:, :, 1:5], peer.pool[:, :, 1:5])
            await asyncio.sleep(0.1)
            assert peer.freed == ["t1"]  # expired right after the read
            await client.close()

    run(main())


def test_extend_lease_over_grpc():
    async def main():
        async with Peer(lease_ms=100) as peer:
            peer.leases.grant("t1", [1])
            client = peer.client(pool(LAYOUT))
            remaining = await client.extend("t1", 2000)
            assert 1500 < remaining <= 2000
            await asyncio.sleep(0.2)
            assert peer.freed == []
            await client.close()

    run(main())
