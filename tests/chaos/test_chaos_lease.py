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
from chaos_cluster import P0_LEASE_MS, metrics
from cluster_token import worker_channel

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
    return metrics(gateway).get('pdserve:disaggregated_requests_total{model_name="tiny",prefill="remote"}', 0.0)


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
    with worker_channel(p1.address) as pc, worker_channel(d0.address) as dc:
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


def test_decode_worker_stalled_mid_pull_past_the_lease(up, figures):
    """d0 is frozen (SIGSTOP) while it pulls from p0, for longer than p0's 4 s lease: when it
    wakes up the lease is gone. Its requests are prefilled again or fail cleanly; none is
    decoded from blocks p0 freed meanwhile, and nothing leaks on either side."""
    url = f"{up.gateways['main'].url}/v1/completions"
    bodies = [completion_body(f"{LONG_PROMPT} {i}", 16, stream=i % 2 == 0) for i in range(4)]
    reference = asyncio.run(_run_all(url, bodies))
    assert all(o.kind == "ok" for o in reference)
    up.wait_all_free()

    async def scenario():
        async with new_client() as client:
            tasks = [asyncio.create_task(request(client, url, b, timeout_s=60)) for b in bodies]
            deadline = time.monotonic() + 20
            while (await asyncio.to_thread(up.debug_state, "d0")).num_pending_imports == 0:
                assert time.monotonic() < deadline, "d0 never started a pull"
            with up.workers["d0"].frozen():
                await asyncio.sleep(P0_LEASE_MS / 1000 + 1.0)
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(scenario())
    details = "\n".join(o.describe() for o in outcomes)
    assert all(o.kind in ("ok", "error") for o in outcomes), details
    for out, ref in zip(outcomes, reference, strict=True):
        if out.kind == "ok":
            assert out.text == ref.text, details
    expired = up.workers["p0"].log_text().count("reason=expired")
    assert expired >= 1, "no lease expired while d0 was stalled"
    up.wait_all_free(timeout_s=15)
    # A segment that vanished with its lease says nothing about shared memory: d0 keeps
    # pulling from p0 through it (the decode log is where the transport shows).
    seen = len(up.workers["d0"].log_text())
    assert [o.kind for o in asyncio.run(_run_all(url, bodies))] == ["ok"] * len(bodies)
    imports = [line for line in up.workers["d0"].log_text()[seen:].splitlines()
               if "kv imported" in line]  # fmt: skip
    assert imports and all("transport=shm" in line for line in imports), imports
    up.wait_all_free()
    figures["stalled_pull"] = {"requests": len(bodies), "stall_s": P0_LEASE_MS / 1000 + 1.0,
                               "leases_expired": expired,
                               "ok_same_text": sum(o.kind == "ok" for o in outcomes),
                               "clean_errors": sum(o.kind == "error" for o in outcomes),
                               "blocks_leaked": 0}  # fmt: skip
