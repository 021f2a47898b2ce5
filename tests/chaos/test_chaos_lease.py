"""KV leases that run out before the decode worker pulls.

p1 grants 1 ms leases and overwrites the blocks of every freed lease with NaN
(--debug-fill-freed-kv): a decode worker that read freed blocks would decode from NaN keys and
values and produce different tokens. So every request must either fail with a clear error or
be prefilled again -- and then give exactly the greedy text of an undisturbed run.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from chaos_client import LONG_PROMPT, completion_body, new_client, request
from chaos_cluster import metrics

from protos.pdserve.v1 import (
    common_pb2,
    kvtransfer_pb2,
    kvtransfer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=8)
PROMPT_IDS = list(range(20, 60))  # 40 tokens: 3 blocks


async def _run_all(url: str, bodies: list[dict]):
    async with new_client() as client:
        return await asyncio.gather(*(request(client, url, b, timeout_s=60) for b in bodies))


def _remote(gateway) -> float:
    return metrics(gateway).get('pdserve:disaggregated_requests_total{prefill="remote"}', 0.0)


def test_expired_lease_is_prefilled_again_never_read(up, figures):
    bodies = [completion_body(f"{LONG_PROMPT} {i}", 24, stream=i % 2 == 0) for i in range(6)]
    reference = asyncio.run(_run_all(f"{up.gateways['main'].url}/v1/completions", bodies))
    assert all(o.kind == "ok" for o in reference)
    gateway = up.gateways["lease"]
    before = _remote(gateway)
    outcomes = asyncio.run(_run_all(f"{gateway.url}/v1/completions", bodies))
    details = "\n".join(o.describe() for o in outcomes)
    assert [(o.kind, o.text) for o in outcomes] == [("ok", r.text) for r in reference], details
    assert _remote(gateway) - before == len(bodies), "the prompts were not prefilled on p1"
    refused = up.workers["p1"].log_text().count("has expired")
    assert refused >= len(bodies), f"p1 refused only {refused} reads of expired leases"
    up.wait_all_free("p1", "d0")
    figures["lease_expiry"] = {"requests": len(bodies), "reprefilled_ok": len(outcomes),
                               "wrong_output": 0, "blocks_leaked": 0}  # fmt: skip


def test_decode_of_an_expired_handle_fails_loudly(up):
    """Worker level: a Decode with an expired handle is FAILED_PRECONDITION, and so is a raw
    ReadBlocks of its blocks -- no bytes of freed (NaN-filled) blocks ever leave p1."""
    p1, d0 = up.workers["p1"], up.workers["d0"]
    with grpc.insecure_channel(p1.address) as pc, grpc.insecure_channel(d0.address) as dc:
        reply = worker_pb2_grpc.PrefillServiceStub(pc).Prefill(
            worker_pb2.PrefillRequest(transfer_id="expire-1", prompt_token_ids=PROMPT_IDS,
                                      sampling=GREEDY), timeout=30)  # fmt: skip
        handle = reply.handle
        time.sleep(0.2)  # 1 ms lease; the reaper runs every 50 ms
        decode = worker_pb2_grpc.DecodeServiceStub(dc).Decode(
            worker_pb2.DecodeRequest(request_id="expire-1", prompt_token_ids=PROMPT_IDS,
                                     sampling=GREEDY, kv_handle=handle), timeout=30)  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            list(decode)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "expired" in info.value.details()
        read = kvtransfer_pb2_grpc.KVTransferServiceStub(pc).ReadBlocks(
            kvtransfer_pb2.ReadBlocksRequest(
                transfer_id="expire-1", block_ids=handle.block_ids, epoch=handle.epoch,
                compat_hash=handle.compat_hash), timeout=30)  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            chunks = list(read)
            pytest.fail(f"read {len(chunks)} chunks of an expired lease")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    up.wait_all_free("p1", "d0")
