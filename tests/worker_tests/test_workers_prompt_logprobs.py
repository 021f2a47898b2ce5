"""Prompt logprobs over the worker protocol: the prefill worker returns them in PrefillResponse,
a decode worker that prefills locally on its first DecodeChunk, and they equal one engine's."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_workers_inprocess import (
    MAX_TOKENS,
    PROMPTS,
    assert_clean,
    cluster,
    make_engine,
    prefill,
    wait_all_free,
)

from contract.limits import MAX_LOGPROBS
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import common_pb2, worker_pb2

K = 3
SAMPLING = common_pb2.SamplingParams(
    temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=K
)


@pytest.fixture(scope="module")
def expected(tiny_llama):
    """One engine's tokens and prompt logprobs for PROMPTS[0]."""
    engine = make_engine(tiny_llama)
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=K
    )
    engine.add_request("ref", PROMPTS[0], params)
    tokens, prompt_logprobs = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            prompt_logprobs = prompt_logprobs or out.prompt_logprobs
    return tokens, prompt_logprobs


def assert_same(got, ref):
    assert len(got) == len(ref) == len(PROMPTS[0]) - 1
    for lp, r in zip(got, ref, strict=True):
        assert lp.logprob == pytest.approx(r.logprob, abs=1e-4)
        assert lp.HasField("rank") and lp.rank == r.rank
        assert [t.token_id for t in lp.top_logprobs] == list(r.top)
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(list(r.top.values()), abs=1e-4)


async def chunks(dstub, request_id, handle=None, sampling=SAMPLING):
    req = worker_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=PROMPTS[0], sampling=sampling
    )
    if handle is not None:
        req.kv_handle.CopyFrom(handle)
    return [chunk async for chunk in dstub.Decode(req, timeout=30)]


def test_prefill_response_carries_them_and_the_decode_does_not_repeat_them(tiny_llama, expected):
    tokens, ref = expected

    async def main():
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            reply = await prefill(pstub, "t-plp", PROMPTS[0], SAMPLING)
            assert_same(reply.prompt_logprobs, ref)
            assert reply.usage.cached_prompt_tokens == 0
            got = await chunks(dstub, "r-plp", reply.handle)
            assert [t for c in got for t in c.token_ids] == tokens
            assert all(len(c.prompt_logprobs) == 0 for c in got)
            # The prompt's blocks are cached now: a second request still gets them whole.
            again = await prefill(pstub, "t-plp-2", PROMPTS[0], SAMPLING)
            assert again.usage.cached_prompt_tokens == 0
            assert_same(again.prompt_logprobs, ref)
            await pstub.Release(worker_pb2.ReleaseRequest(transfer_id="t-plp-2"), timeout=10)
            plain = await prefill(pstub, "t-plain", PROMPTS[0])
            assert plain.usage.cached_prompt_tokens > 0 and not plain.prompt_logprobs
            await pstub.Release(worker_pb2.ReleaseRequest(transfer_id="t-plain"), timeout=10)
            assert_clean(await wait_all_free(pstub))
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_local_prefill_sends_them_on_the_first_chunk(tiny_llama, expected):
    tokens, ref = expected

    async def main():
        async with cluster(tiny_llama) as (_, dstub, p, d):
            got = await chunks(dstub, "r-local")
            assert [t for c in got for t in c.token_ids] == tokens
            assert_same(got[0].prompt_logprobs, ref)
            assert all(len(c.prompt_logprobs) == 0 for c in got[1:])
            assert_clean(await wait_all_free(dstub))

    asyncio.run(main())


def test_more_than_the_limit_is_invalid_argument(tiny_llama):
    sampling = common_pb2.SamplingParams(max_tokens=2, prompt_logprobs=MAX_LOGPROBS + 1)

    async def main():
        async with cluster(tiny_llama) as (pstub, dstub, p, d):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await prefill(pstub, "t-big", PROMPTS[0], sampling)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "prompt_logprobs" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await chunks(dstub, "r-big", sampling=sampling)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())
