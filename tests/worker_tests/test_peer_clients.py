"""The decode worker's per-endpoint KV clients: capped, least recently used retired first, and a
retired client closed only once nothing runs on it."""

from __future__ import annotations

import asyncio

import pytest

from worker.importer import PeerClients


class FakeClient:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def test_the_least_recently_used_idle_client_is_closed_past_the_cap():
    async def main():
        made: dict[str, FakeClient] = {}

        def make(ep: str) -> FakeClient:
            made[ep] = FakeClient(ep)
            return made[ep]

        peers = PeerClients(make, capacity=2)
        for ep in ("a", "b", "a", "c"):  # "a" used again: "b" is the least recent
            async with peers.use(ep) as client:
                assert client.endpoint == ep
        await asyncio.sleep(0)
        assert len(peers) == 2 and made["b"].closed
        assert not made["a"].closed and not made["c"].closed
        async with peers.use("a") as again:
            assert again is made["a"]  # reused, not redialed
        await peers.close()
        assert all(c.closed for c in made.values())

    asyncio.run(main())


def test_a_retired_client_stays_open_until_its_pull_ends():
    async def main():
        peers = PeerClients(FakeClient, capacity=1)
        pulling, done = asyncio.Event(), asyncio.Event()

        async def long_pull():
            async with peers.use("old") as client:
                pulling.set()
                await done.wait()
                assert not client.closed  # retired meanwhile, but in use
            return client

        task = asyncio.create_task(long_pull())
        await pulling.wait()
        async with peers.use("new"):
            pass
        done.set()
        old = await task
        await asyncio.sleep(0)
        assert old.closed and len(peers) == 1
        await peers.close()

    asyncio.run(main())


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        PeerClients(FakeClient, capacity=0)
