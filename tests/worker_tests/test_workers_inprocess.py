"""Prefill worker + decode worker in one process, over real gRPC on 127.0.0.1, tiny model.

Disaggregated output (prefill on A, KV pulled into B over gRPC or shared memory, decode on B)
must equal one engine doing both, and every block must come back on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from contract.histogram import QUEUE_TIME_BUCKETS
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from rpc.server import ServerOptions
from worker.config import DecodeWorkerConfig, PrefillWorkerConfig
from worker.server import start_decode_server, start_prefill_server

PROMPTS = [list(range(3, 40)), [7, 8, 9, 10, 11] * 7, list(range(100, 148))]  # 37, 35, 48 tokens
MAX_TOKENS = 12
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def make_engine(model, **kw) -> LLMEngine:
    cfg = dict(model=str(model), kv_cache_memory=1 << 20, block_size=16)  # 128 blocks
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def reference(tiny_llama):
    engine = make_engine(tiny_llama)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, params)
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for o in engine.step():
                tokens += o.new_token_ids
        out[i] = tokens
    return out


@contextlib.asynccontextmanager
async def cluster(
    model, *, transport="grpc", prefill_cfg=None, prefill_engine_kw=None, decode_engine_kw=None
):
    prefill_engine = make_engine(model, **(prefill_engine_kw or {}))
    decode_engine = make_engine(model, **(decode_engine_kw or {}))
    p = await start_prefill_server(
        prefill_engine, prefill_cfg or PrefillWorkerConfig(), ServerOptions(port=0)
    )
    d = await start_decode_server(
        decode_engine, DecodeWorkerConfig(kv_transport=transport), ServerOptions(port=0)
    )
    p_channel = grpc.aio.insecure_channel(p.address)
    d_channel = grpc.aio.insecure_channel(d.address)
    try:
        yield (
            worker_pb2_grpc.PrefillServiceStub(p_channel),
            worker_pb2_grpc.DecodeServiceStub(d_channel),
            p,
            d,
        )
    finally:
        await p_channel.close()
        await d_channel.close()
        await d.stop(drain_s=0)
        await p.stop(drain_s=0)


async def prefill(pstub, transfer_id, prompt, sampling=GREEDY, **kw):
    return await pstub.Prefill(
        worker_pb2.PrefillRequest(
            transfer_id=transfer_id, prompt_token_ids=prompt, sampling=sampling, **kw
        ),
        timeout=30,
    )


async def decode(dstub, request_id, prompt, handle=None, sampling=GREEDY, timeout=30):
    req = worker_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=sampling
    )
    if handle is not None:
        req.kv_handle.CopyFrom(handle)
    tokens, last = [], None
    async for chunk in dstub.Decode(req, timeout=timeout):
        tokens += chunk.token_ids
        last = chunk
    return tokens, last


async def wait_all_free(stub, timeout=5.0):
    """Poll GetDebugState until every block is free and nothing is held; return the state."""
    deadline = time.monotonic() + timeout
    while True:
        state = await stub.GetDebugState(common_pb2.GetDebugStateRequest())
        clean = (
            state.num_free_blocks == state.num_blocks
            and state.num_held_leases == 0
            and state.num_running == 0
            and state.num_pending_imports == 0
            and state.num_shm_segments == 0
        )
        if clean or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.02)


def assert_clean(state):
    assert state.num_free_blocks == state.num_blocks, state
    assert state.num_held_leases == 0 and list(state.held_transfer_ids) == [], state
    assert state.num_running == 0 and state.num_waiting == 0, state
    assert state.num_pending_imports == 0 and state.num_shm_segments == 0, state


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_disaggregated_equals_one_engine(tiny_llama, reference, transport):
    async def main():
        async with cluster(tiny_llama, transport=transport) as (pstub, dstub, p, d):
            # Concurrent prompts: the prefill worker batches them through its engine loop.
            replies = await asyncio.gather(
                *(prefill(pstub, f"t{i}", prompt) for i, prompt in enumerate(PROMPTS))
            )
            for i, reply in enumerate(replies):
                h = reply.handle
                assert h.first_token == reference[i][0]
                assert h.num_tokens == len(PROMPTS[i]) and h.epoch == p.worker.identity.epoch
                assert reply.usage.prompt_tokens == len(PROMPTS[i])
            for i, reply in enumerate(replies):
                tokens, last = await decode(dstub, f"r{i}", PROMPTS[i], reply.handle)
                assert tokens == reference[i], f"prompt {i}"
                assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert last.usage.completion_tokens == MAX_TOKENS
            assert d.worker.importer.pulls_by_transport == {transport: len(PROMPTS)}
            assert_clean(await wait_all_free(pstub))
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_decode_without_handle_prefills_locally(tiny_llama, reference):
    async def main():
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            tokens, last = await decode(dstub, "local", PROMPTS[1])
            assert tokens == reference[1]
            assert last.usage.prompt_tokens == len(PROMPTS[1])
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_cancel_mid_stream_frees_blocks(tiny_llama):
    async def main():
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            long = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
            reply = await prefill(pstub, "t-cancel", PROMPTS[0], long)
            req = worker_pb2.DecodeRequest(
                request_id="r-cancel", prompt_token_ids=PROMPTS[0], sampling=long,
                kv_handle=reply.handle,
            )  # fmt: skip
            call = dstub.Decode(req, timeout=30)
            seen = 0
            async for chunk in call:
                seen += len(chunk.token_ids)
                if seen >= 3:
                    break
            call.cancel()
            assert_clean(await wait_all_free(dstub))
            assert_clean(await wait_all_free(pstub))

    asyncio.run(main())


def test_abort_ends_the_stream_with_abort(tiny_llama):
    async def main():
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            long = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
            req = worker_pb2.DecodeRequest(
                request_id="r-abort", prompt_token_ids=PROMPTS[2], sampling=long
            )
            last = None
            async for chunk in dstub.Decode(req, timeout=30):
                if last is None:
                    reply = await dstub.Abort(worker_pb2.AbortRequest(request_id="r-abort"))
                    assert reply.aborted
                last = chunk
            assert last.finish_reason == common_pb2.FINISH_REASON_ABORT
            assert not (await dstub.Abort(worker_pb2.AbortRequest(request_id="r-abort"))).aborted
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_deadline_is_respected_and_frees_blocks(tiny_llama):
    async def main():
        # The eager forward: 450 tiny-model steps take ~1 s there, well past the 0.3 s deadline
        # (the compiled one can finish them inside it).
        eager = {"enforce_eager": True}
        async with cluster(tiny_llama, decode_engine_kw=eager) as (pstub, dstub, p, d):
            long = common_pb2.SamplingParams(temperature=0.0, max_tokens=450, ignore_eos=True)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await decode(dstub, "r-deadline", PROMPTS[0], sampling=long, timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_unreleased_lease_expires_and_frees_prefill_blocks(tiny_llama):
    async def main():
        cfg = PrefillWorkerConfig(lease_ms=100)
        async with cluster(tiny_llama, prefill_cfg=cfg) as (pstub, dstub, p, d):
            reply = await prefill(pstub, "t-expire", PROMPTS[0])
            state = await pstub.GetDebugState(common_pb2.GetDebugStateRequest())
            assert list(state.held_transfer_ids) == ["t-expire"]
            assert state.num_free_blocks < state.num_blocks
            await asyncio.sleep(0.3)
            assert_clean(await wait_all_free(pstub))
            # Decoding with the dead handle fails loudly and leaves nothing behind.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await decode(dstub, "r-late", PROMPTS[0], reply.handle)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_release_rpc_frees_and_sentinel_fill_overwrites(tiny_llama):
    async def main():
        cfg = PrefillWorkerConfig(fill_freed_kv=True)
        kw = dict(enable_prefix_caching=False)
        async with cluster(tiny_llama, prefill_cfg=cfg, prefill_engine_kw=kw) as (pstub, _, p, _d):
            reply = await prefill(pstub, "t-rel", PROMPTS[0])
            blocks = list(reply.handle.block_ids)
            released = await pstub.Release(worker_pb2.ReleaseRequest(transfer_id="t-rel"))
            assert released.released
            assert not (
                await pstub.Release(worker_pb2.ReleaseRequest(transfer_id="t-rel"))
            ).released
            assert_clean(await wait_all_free(pstub))
            kv = p.worker.paged._pages[:, :, blocks]
            assert bool((kv == 0xFF).all())

    asyncio.run(main())


def test_bad_requests_get_clear_status_codes(tiny_llama):
    async def main():
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await prefill(pstub, "t-empty", [])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await prefill(pstub, "t-bad", [10**6])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            reply = await prefill(pstub, "t-dup", PROMPTS[0])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await prefill(pstub, "t-dup", PROMPTS[0])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            bad = worker_pb2.KVHandle()
            bad.CopyFrom(reply.handle)
            bad.compat_hash = "0" * 32
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await decode(dstub, "r-hash", PROMPTS[0], bad)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await decode(dstub, "r-len", PROMPTS[0][:-1], reply.handle)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            bad_params = common_pb2.SamplingParams(temperature=-1.0)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await decode(dstub, "r-temp", PROMPTS[0], sampling=bad_params)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await pstub.Release(worker_pb2.ReleaseRequest(transfer_id="t-dup"))
            assert_clean(await wait_all_free(pstub))
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_load_reports_and_health(tiny_llama):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def main():
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            reply = await prefill(pstub, "t-load", PROMPTS[0])
            load = await pstub.GetLoad(common_pb2.GetLoadRequest())
            assert load.role == "prefill" and load.num_held == 1 and load.serving
            assert load.epoch == p.worker.identity.epoch and 0 < load.kv_cache_usage < 1
            # The engine's histograms: one request queued, one step computing its prompt.
            assert load.queue_time_bucket_counts[-1] == 1 and load.queue_time_sum >= 0
            assert len(load.queue_time_bucket_counts) == len(QUEUE_TIME_BUCKETS) + 1
            assert load.iteration_tokens_bucket_counts[-1] == 1
            assert load.iteration_tokens_sum == len(PROMPTS[0])
            load = await dstub.GetLoad(common_pb2.GetLoadRequest())
            assert load.role == "decode" and load.num_free_blocks == load.num_blocks
            assert list(load.queue_time_bucket_counts) == [0] * (len(QUEUE_TIME_BUCKETS) + 1)
            await decode(dstub, "t-load", PROMPTS[0], reply.handle)
            load = await dstub.GetLoad(common_pb2.GetLoadRequest())
            assert load.queue_time_bucket_counts[-1] == 1  # the import, at its first decode step
            counts = load.iteration_tokens_bucket_counts
            assert counts[0] == counts[-1] == load.iteration_tokens_sum == MAX_TOKENS - 1
            async with grpc.aio.insecure_channel(d.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="pdserve.v1.DecodeService")
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())


def test_logprobs_survive_disaggregation(tiny_llama):
    async def main():
        engine = make_engine(tiny_llama)
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
        engine.add_request("ref", PROMPTS[0], params)
        expected = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                expected += out.new_logprobs or []
        sampling = common_pb2.SamplingParams(
            temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2
        )
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            reply = await prefill(pstub, "t-lp", PROMPTS[0], sampling)
            assert reply.handle.HasField("first_token_logprobs")
            req = worker_pb2.DecodeRequest(
                request_id="r-lp", prompt_token_ids=PROMPTS[0], sampling=sampling,
                kv_handle=reply.handle,
            )  # fmt: skip
            got = [lp async for chunk in dstub.Decode(req, timeout=30) for lp in chunk.logprobs]
        assert len(got) == len(expected) == 5
        for lp, ref in zip(got, expected, strict=True):
            assert lp.logprob == pytest.approx(ref.logprob, abs=1e-4)
            top = {t.token_id: t.logprob for t in lp.top_logprobs}
            assert top.keys() == ref.top.keys()

    asyncio.run(main())


def test_first_token_can_finish_the_request(tiny_llama, reference):
    async def main():
        one = common_pb2.SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            reply = await prefill(pstub, "t-one", PROMPTS[0], one)
            tokens, last = await decode(dstub, "r-one", PROMPTS[0], reply.handle, sampling=one)
            assert tokens == reference[0][:1]
            assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert_clean(await wait_all_free(pstub))
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_drain_refuses_new_work_and_waits_for_leases(tiny_llama):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def main():
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            await prefill(pstub, "t-held", PROMPTS[0])
            await p.running.set_serving(False)
            drain = asyncio.create_task(p.worker.drain(10.0))
            await asyncio.sleep(0.1)
            assert not drain.done()  # waits for the open lease
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await prefill(pstub, "t-new", PROMPTS[1])
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(p.address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="")
                )
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await pstub.Release(worker_pb2.ReleaseRequest(transfer_id="t-held"))
            await asyncio.wait_for(drain, 2.0)

    asyncio.run(main())


def test_decode_worker_speculates_with_a_draft_over_imported_kv(tiny_llama, reference):
    # The prefill worker has no draft; the decode worker imports the target's prompt KV and
    # builds the draft's itself (its first proposal step prefills the draft locally).
    spec = {"method": "draft_model", "model": str(tiny_llama), "num_speculative_tokens": 3,
            "disable_by_batch_size": None}  # fmt: skip

    async def main():
        async with cluster(tiny_llama, decode_engine_kw={"speculative_config": spec}) as (
            pstub,
            dstub,
            _,
            d,
        ):
            for i, prompt in enumerate(PROMPTS):
                reply = await prefill(pstub, f"s{i}", prompt)
                tokens, _ = await decode(dstub, f"s{i}", prompt, reply.handle)
                assert tokens == reference[i], f"prompt {i}"
            load = await dstub.GetLoad(common_pb2.GetLoadRequest())
            assert load.spec_decode_num_draft_tokens > 0
            assert load.spec_decode_num_accepted_tokens == load.spec_decode_num_draft_tokens
            assert sum(load.spec_decode_num_accepted_tokens_per_pos) == (
                load.spec_decode_num_accepted_tokens
            )
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())
