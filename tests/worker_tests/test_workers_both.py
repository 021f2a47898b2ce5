"""A worker in both roles (`pdserve both`): prefill and decode on one engine, over real gRPC.

It runs a whole request itself (its own handle copied within the pool, no socket), prefills for
another decode worker, decodes what another prefill worker computed, and gives every block back.
"""

from __future__ import annotations

import asyncio

import grpc
from test_workers_inprocess import (
    PROMPTS,
    assert_clean,
    decode,
    make_engine,
    prefill,
    reference,  # noqa: F401  (fixture)
    wait_all_free,
)

from protos.pdserve.v1 import worker_pb2_grpc
from rpc.server import ServerOptions
from worker.config import BothWorkerConfig, DecodeWorkerConfig, PrefillWorkerConfig
from worker.server import start_both_server, start_decode_server, start_prefill_server


def stubs(address: str):
    channel = grpc.aio.insecure_channel(address)
    return (
        channel,
        worker_pb2_grpc.PrefillServiceStub(channel),
        worker_pb2_grpc.DecodeServiceStub(channel),
    )


def test_both_runs_a_request_end_to_end_and_copies_its_own_handles(tiny_llama, reference):  # noqa: F811
    async def main():
        # No prefix cache: every block of the handle has to be copied, none is found cached.
        engine = make_engine(tiny_llama, enable_prefix_caching=False)
        both = await start_both_server(engine, BothWorkerConfig(), ServerOptions(port=0))
        channel, pstub, dstub = stubs(both.address)
        try:
            assert both.role == "both" and both.worker.identity.engine_id.startswith("both-")
            replies = await asyncio.gather(
                *(prefill(pstub, f"t{i}", p) for i, p in enumerate(PROMPTS))
            )
            for i, reply in enumerate(replies):
                assert reply.handle.kv_endpoint == both.address
                tokens, _ = await decode(dstub, f"r{i}", PROMPTS[i], reply.handle)
                assert tokens == reference[i], f"prompt {i}"
            pulls = both.worker.decode.importer.pulls_by_transport
            assert pulls == {"local": len(PROMPTS)}
            assert_clean(await wait_all_free(pstub))
            assert_clean(await wait_all_free(dstub))
        finally:
            await channel.close()
            await both.stop(drain_s=0)

    asyncio.run(main())


def test_both_serves_and_uses_other_workers(tiny_llama, reference):  # noqa: F811
    async def main():
        both = await start_both_server(
            make_engine(tiny_llama), BothWorkerConfig(), ServerOptions(port=0)
        )
        p = await start_prefill_server(
            make_engine(tiny_llama), PrefillWorkerConfig(), ServerOptions(port=0)
        )
        d = await start_decode_server(
            make_engine(tiny_llama), DecodeWorkerConfig(kv_transport="grpc"), ServerOptions(port=0)
        )
        b_channel, b_pstub, b_dstub = stubs(both.address)
        p_channel, p_pstub, _ = stubs(p.address)
        d_channel, _, d_dstub = stubs(d.address)
        try:
            # both prefills, a decode-only worker pulls from it over gRPC.
            reply = await prefill(b_pstub, "t0", PROMPTS[0])
            tokens, _ = await decode(d_dstub, "r0", PROMPTS[0], reply.handle)
            assert tokens == reference[0]
            assert d.worker.importer.pulls_by_transport == {"grpc": 1}
            # a prefill-only worker prefills, both decodes (pulling from a peer, not locally).
            reply = await prefill(p_pstub, "t1", PROMPTS[1])
            tokens, _ = await decode(b_dstub, "r1", PROMPTS[1], reply.handle)
            assert tokens == reference[1]
            assert "local" not in both.worker.decode.importer.pulls_by_transport
            # and a request with no handle prefills locally on both.
            tokens, _ = await decode(b_dstub, "r2", PROMPTS[2])
            assert tokens == reference[2]
            for stub in (b_pstub, b_dstub, p_pstub, d_dstub):
                assert_clean(await wait_all_free(stub))
        finally:
            for channel in (b_channel, p_channel, d_channel):
                await channel.close()
            await d.stop(drain_s=0)
            await p.stop(drain_s=0)
            await both.stop(drain_s=0)

    asyncio.run(main())
