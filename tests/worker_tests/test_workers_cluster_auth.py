"""Trust between services, in one process over real gRPC: every worker RPC needs the cluster
credential (health stays open), and a decode worker refuses a KV handle no trusted prefill
worker signed before it connects anywhere."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from engine.engine import LLMEngine
from kvtransfer import wire as kv_wire
from kvtransfer.handle import HANDLE_KEY_PURPOSE, sign_handle
from protos.pdserve.v1 import (
    common_pb2,
    kvtransfer_pb2,
    kvtransfer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from rpc.auth import CLUSTER_TOKEN_KEY, ClusterSecret
from rpc.server import ServerOptions
from worker.config import DecodeWorkerConfig, PrefillWorkerConfig
from worker.server import start_decode_server, start_prefill_server

SECRET = ClusterSecret("cluster-auth-test-secret")
PROMPT = list(range(30, 70))
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
GOOD = ((CLUSTER_TOKEN_KEY, SECRET.token),)
WRONG = ((CLUSTER_TOKEN_KEY, ClusterSecret("some other cluster's secret").token),)


def engine(model) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), kv_cache_memory=1 << 20, enforce_eager=True))


def worker_calls(p_channel, d_channel):
    """(name, coroutine factory taking metadata) for every worker RPC."""
    p = worker_pb2_grpc.PrefillServiceStub(p_channel)
    kv = kvtransfer_pb2_grpc.KVTransferServiceStub(p_channel)
    d = worker_pb2_grpc.DecodeServiceStub(d_channel)
    prefill = worker_pb2.PrefillRequest(transfer_id="x", prompt_token_ids=PROMPT, sampling=GREEDY)
    read = kvtransfer_pb2.ReadBlocksRequest(transfer_id="x", block_ids=[0])
    decode = worker_pb2.DecodeRequest(request_id="x", prompt_token_ids=PROMPT, sampling=GREEDY)

    async def stream(call):
        return [m async for m in call]

    return [
        ("Prefill", lambda md: p.Prefill(prefill, metadata=md, timeout=10)),
        ("Release", lambda md: p.Release(worker_pb2.ReleaseRequest(transfer_id="x"), metadata=md)),
        ("P.GetLoad", lambda md: p.GetLoad(common_pb2.GetLoadRequest(), metadata=md)),
        (
            "P.GetDebugState",
            lambda md: p.GetDebugState(common_pb2.GetDebugStateRequest(), metadata=md),
        ),  # fmt: skip
        ("Handshake", lambda md: kv.Handshake(kvtransfer_pb2.HandshakeRequest(), metadata=md)),
        ("ReadBlocks", lambda md: stream(kv.ReadBlocks(read, metadata=md))),
        ("ReadBlocksShm", lambda md: kv.ReadBlocksShm(read, metadata=md)),
        (
            "ExtendLease",
            lambda md: kv.ExtendLease(
                kvtransfer_pb2.ExtendLeaseRequest(transfer_id="x", lease_ms=300_000), metadata=md
            ),
        ),
        (
            "KV.Release",
            lambda md: kv.Release(kvtransfer_pb2.KVReleaseRequest(transfer_id="x"), metadata=md),
        ),  # fmt: skip
        ("Decode", lambda md: stream(d.Decode(decode, metadata=md, timeout=10))),
        ("Abort", lambda md: d.Abort(worker_pb2.AbortRequest(request_id="x"), metadata=md)),
        ("D.GetLoad", lambda md: d.GetLoad(common_pb2.GetLoadRequest(), metadata=md)),
        (
            "D.GetDebugState",
            lambda md: d.GetDebugState(common_pb2.GetDebugStateRequest(), metadata=md),
        ),  # fmt: skip
    ]


async def start_pair(model):
    options = ServerOptions(port=0, cluster_secret=SECRET)
    p = await start_prefill_server(
        engine(model), PrefillWorkerConfig(cluster_secret=SECRET), options
    )
    d = await start_decode_server(
        engine(model), DecodeWorkerConfig(kv_transport="grpc", cluster_secret=SECRET), options
    )
    return p, d


def test_every_worker_rpc_needs_the_cluster_credential(tiny_llama):
    async def main():
        p, d = await start_pair(tiny_llama)
        try:
            async with (
                grpc.aio.insecure_channel(p.address) as pc,
                grpc.aio.insecure_channel(d.address) as dc,
            ):
                calls = worker_calls(pc, dc)
                assert len(calls) == 13
                for name, call in calls:
                    for metadata in (None, WRONG, ((CLUSTER_TOKEN_KEY, ""),)):
                        with pytest.raises(grpc.aio.AioRpcError) as info:
                            await call(metadata)
                        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                # Nothing ran: no prefill, no lease, every block free on both sides.
                for channel, stub in ((pc, worker_pb2_grpc.PrefillServiceStub),
                                      (dc, worker_pb2_grpc.DecodeServiceStub)):  # fmt: skip
                    state = await stub(channel).GetDebugState(
                        common_pb2.GetDebugStateRequest(), metadata=GOOD
                    )
                    assert state.num_free_blocks == state.num_blocks and not state.held_transfer_ids
                    health = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="")
                    )  # probes need no credential
                    assert health.status == health_pb2.HealthCheckResponse.SERVING
                # With the credential the whole path works: a signed handle, pulled, decoded.
                reply = await worker_pb2_grpc.PrefillServiceStub(pc).Prefill(
                    worker_pb2.PrefillRequest(transfer_id="ok-1", prompt_token_ids=PROMPT,
                                              sampling=GREEDY), metadata=GOOD, timeout=30)  # fmt: skip
                assert len(reply.handle.signature) == 32 and reply.handle.expires_at_ms > 0
                request = worker_pb2.DecodeRequest(request_id="ok-1", prompt_token_ids=PROMPT,
                                                   sampling=GREEDY, kv_handle=reply.handle)  # fmt: skip
                chunks = [c async for c in worker_pb2_grpc.DecodeServiceStub(dc).Decode(
                    request, metadata=GOOD, timeout=30)]  # fmt: skip
                assert sum(len(c.token_ids) for c in chunks) == 4
                assert d.worker.importer.pulls_by_transport == {"grpc": 1}
        finally:
            await d.stop(drain_s=0)
            await p.stop(drain_s=0)

    asyncio.run(main())


def test_decode_refuses_unsigned_altered_or_foreign_handles_without_dialing(tiny_llama):
    async def main():
        p, d = await start_pair(tiny_llama)
        dialed: list[int] = []

        async def on_connect(reader, writer):
            dialed.append(1)
            writer.close()

        bait = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        bait_address = f"127.0.0.1:{bait.sockets[0].getsockname()[1]}"
        try:
            async with (
                grpc.aio.insecure_channel(p.address) as pc,
                grpc.aio.insecure_channel(d.address) as dc,
            ):
                reply = await worker_pb2_grpc.PrefillServiceStub(pc).Prefill(
                    worker_pb2.PrefillRequest(transfer_id="h-1", prompt_token_ids=PROMPT,
                                              sampling=GREEDY), metadata=GOOD, timeout=30)  # fmt: skip
                genuine = kv_wire.handle_from_pb(reply.handle)
                foreign_key = ClusterSecret("another cluster's secret").derive(HANDLE_KEY_PURPOSE)
                bad = {
                    "unsigned": dataclasses.replace(genuine, kv_endpoint=bait_address,
                                                    signature=b""),
                    "altered endpoint": dataclasses.replace(genuine, kv_endpoint=bait_address),
                    "unix socket": dataclasses.replace(genuine, kv_endpoint="unix:/tmp/sock"),
                    "foreign key": sign_handle(
                        dataclasses.replace(genuine, kv_endpoint=bait_address), foreign_key, 30_000
                    ),
                    "expired": sign_handle(
                        genuine, SECRET.derive(HANDLE_KEY_PURPOSE), valid_ms=-60_000
                    ),
                }  # fmt: skip
                stub = worker_pb2_grpc.DecodeServiceStub(dc)
                for name, handle in bad.items():
                    request = worker_pb2.DecodeRequest(
                        request_id=f"bad-{name}", prompt_token_ids=PROMPT, sampling=GREEDY,
                        kv_handle=kv_wire.handle_to_pb(handle),
                    )  # fmt: skip
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        [c async for c in stub.Decode(request, metadata=GOOD, timeout=10)]
                    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
                    assert "HandleSignatureError" in info.value.details(), name
                await asyncio.sleep(0.2)
                assert dialed == []  # never connected to the endpoint in a bad handle
                assert len(d.worker.importer._clients) == 0  # nor to the genuine one
                state = await stub.GetDebugState(common_pb2.GetDebugStateRequest(), metadata=GOOD)
                assert state.num_free_blocks == state.num_blocks and state.num_pending_imports == 0
                await worker_pb2_grpc.PrefillServiceStub(pc).Release(
                    worker_pb2.ReleaseRequest(transfer_id="h-1"), metadata=GOOD
                )
        finally:
            bait.close()
            await d.stop(drain_s=0)
            await p.stop(drain_s=0)

    asyncio.run(main())
